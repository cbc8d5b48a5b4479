// The head of every host mailbox (pinned, mapped memory the kernels write and
// the host reads), and the error vocabulary shared by all kernel families.
// Python reads these words by index (deepcomm/kernel_backend.py).
#pragma once

#include <cstdint>

namespace deepcomm {

struct MailboxHeader {
  int64_t error_code;   // ErrorCode; the first failure wins
  int64_t error_stage;  // Stage
  int64_t error_peer;   // timeout: the rank that did not answer; size mismatch: the actual row count
  int64_t notify_done;  // sequence number of the last finished notify
};

enum ErrorCode : int64_t {
  kErrorNone = 0,
  kErrorTimeout = 1,
  kErrorSizeMismatch = 2,
  kErrorInvalidIds = 3,
  kErrorModeMismatch = 4,  // ranks disagree on reusing a handle's routing in one call; detail: a rank that differs
  kErrorShapeMismatch = 5,  // ranks disagree on a call's shape (hidden size, K, row format, experts, blocks); detail: a rank
  kErrorCombineModeMismatch = 6,  // ranks disagree on pushing or pulling a combine's rows; detail: a rank that differs
};

// Why a dispatch writes nothing (notify's abort_dispatch word). Invalid ids: the ranks still count each
// other's blocks (the communicator carries on). A failed meeting (a peer late, or another call shape or
// reused handle): the communicator is done (its failure sticks), so the dispatch returns at once rather
// than wait for blocks whose number may differ between the ranks.
constexpr int32_t kAbortInvalidIds = 1;
constexpr int32_t kAbortFailedMeeting = 2;

// Where a kernel was waiting when it gave up.
enum Stage : int64_t {
  kStageNotify = 1,         // counts from every rank
  kStageDispatch = 2,       // node peers finishing the rows they write here
  kStageCombineReady = 3,   // node peers publishing their expert outputs
  kStageCombineDone = 4,    // node peers finishing reads of this rank's outputs
  kStageForward = 5,        // rows from the inter-node partner (internode dispatch)
  kStageCombineCredit = 6,  // the home rank freeing its partial-sum area (internode combine)
  kStageCombineRecv = 7,    // partial sums from another node's gateway (internode combine)
  kStageLowLatencyStaging = 8,  // every rank done reading the rows this rank staged there last time (low-latency send)
  kStageLowLatencyRows = 9,     // every rank finishing the rows it sends here (low-latency receive)
  kStageLowLatencyOutputs = 10, // every rank's expert outputs in place (low-latency combine)
  kStageLowLatencyPartials = 11,  // every owner's partial sums of this rank's tokens (low-latency combine, weights at dispatch)
  kStageCombineLanded = 12,       // rows a peer's copy engines push into this rank's landing area (intranode combine)
};

}  // namespace deepcomm
