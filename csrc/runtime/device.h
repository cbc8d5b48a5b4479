// Device queries through the CUDA runtime. On a machine without a driver or
// without a GPU they report zero devices instead of failing, so the module
// imports and answers everywhere.
#pragma once

#include <string>

namespace deepcomm {

struct DeviceInfo {
  int index;
  std::string name;
  int major;
  int minor;
  int num_sms;
  size_t total_memory_bytes;
  int max_shared_memory_per_block_optin;
  bool can_map_host_memory;
};

int device_count();
DeviceInfo device_info(int device);
int driver_version();   // 0 when no driver is installed
int runtime_version();

}  // namespace deepcomm
