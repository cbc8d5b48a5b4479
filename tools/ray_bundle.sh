#!/usr/bin/env bash
# Ray for a machine without a package index (an air-gapped GPU host, or one reached by copying a
# folder of limited size): what `python -m deepcomm.ray_launch` needs of Ray, packed on a machine
# with the index and unpacked there.
#
#   tools/ray_bundle.sh make DIR [PYTHON_VERSION]   # e.g. 3.12: Ray's wheel for that Python, its
#                                                   # dependencies' wheels, into DIR (about 23 MB)
#   tools/ray_bundle.sh install DIR [SITE]          # on the target: into the site-packages of $PYTHON
#                                                   # (python3 by default), or into the folder SITE
#                                                   # with every dependency (a self-contained folder
#                                                   # for PYTHONPATH, ahead of the environment's own)
#
# The wheel is about 80 MB; the bundle keeps Ray's core (raylet, GCS, the Python API and the dashboard
# agent's modules) and leaves out what a launcher never imports (RLlib, Tune, Train, Serve, Data, the
# LLM library, the Java jars, the dashboard's web client), then compresses with xz: about 20 MB.
set -euo pipefail
RAY_VERSION=${RAY_VERSION:-2.60.0}
PYTHON=${PYTHON:-python3}
# Subpackages and data the launcher does not need (ray_launch: ray.init, actors, placement groups).
UNUSED="ray/jars ray/rllib ray/tune ray/train ray/serve ray/data ray/llm ray/workflow ray/dashboard/client"

usage() { sed -n '2,16p' "$0" >&2; exit 2; }
[ $# -ge 2 ] || usage
command=$1 dir=$2

case $command in
  make)
    py=${3:-$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
    [[ $py =~ ^3\.[0-9]+$ ]] || { echo "ray_bundle: PYTHON_VERSION: expected 3.N, got $py" >&2; exit 2; }
    tag=cp${py/./}
    mkdir -p "$dir/deps"
    work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
    platforms="--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64"
    # shellcheck disable=SC2086  # the platform flags are words
    pip download --no-deps --only-binary=:all: --python-version "$py" $platforms "ray==$RAY_VERSION" -d "$work"
    # Every requirement but the extras' (pip evaluates the other markers for the target Python).
    requirements=$(unzip -p "$work"/ray-*.whl "ray-$RAY_VERSION.dist-info/METADATA" \
      | sed -n 's/^Requires-Dist: //p' | grep -v 'extra *==' || true)
    echo "$requirements" > "$dir/requirements.txt"
    # shellcheck disable=SC2086
    pip download --only-binary=:all: --python-version "$py" $platforms -r "$dir/requirements.txt" -d "$dir/deps"
    mkdir "$work/tree"
    # shellcheck disable=SC2086  # UNUSED is a list of paths
    (cd "$work/tree" && unzip -q "$work"/ray-*.whl && rm -rf $UNUSED && find . -name '*.js.map' -delete)
    # Named members owned by root: unpacking must not change the site folder itself, nor give its files to
    # whoever packed them.
    tar -C "$work/tree" --owner=0 --group=0 --numeric-owner -cf - ray "ray-$RAY_VERSION.dist-info" \
      | xz -T0 -9 > "$dir/ray-$RAY_VERSION-$tag.tar.xz"
    du -sh "$dir"
    ;;
  install)
    tag=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    archives=("$dir"/ray-*-"$tag".tar.xz)
    archive=${archives[0]}
    [ -f "$archive" ] || { echo "ray_bundle: no Ray bundle for $tag in $dir" >&2; exit 1; }
    [ ${#archives[@]} -eq 1 ] || { echo "ray_bundle: several Ray bundles for $tag in $dir: ${archives[*]}" >&2; exit 1; }
    # Into the environment: only what is missing or too old (the packages there, torch's among them, stay).
    # Into SITE: pip --target installs every requirement there.
    site=${3:-$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')}
    target=(); [ $# -ge 3 ] && target=(--target "$site")
    "$PYTHON" -m pip install -q --no-index --find-links "$dir/deps" ${target[@]+"${target[@]}"} -r "$dir/requirements.txt"
    tar -C "$site" --no-same-owner -xJf "$archive"
    PYTHONPATH="$site" "$PYTHON" -c 'import ray; print("ray", ray.__version__, "from", ray.__file__)'
    ;;
  *) usage ;;
esac
