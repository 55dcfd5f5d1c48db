#!/usr/bin/env bash
# Set-up and entry points on a fresh Debian machine, as root. Installs what it needs
# (idempotent: a second run installs nothing), then runs one job:
#   ./run.sh demo [ARGS]   the main job, `splitexit up`: train the recommended default on
#                          Fashion-MNIST if runs/default/ is missing, then run broker,
#                          workers and edge producers replaying the test set; print the report
#   ./run.sh test          the test suite (what CI runs)
set -euo pipefail
cd "$(dirname "$0")"

setup() {
    # Fashion-MNIST for the main job; Prometheus (and promtool) for the monitoring tests;
    # a C compiler for the native training kernel and the C export (both have fallbacks or
    # skips without one, but the main job trains faster with it); libzmq's headers for the
    # C device edge (examples/c_edge), which a test builds and runs against a real broker;
    # the Cortex-M4 toolchain and newlib: a test sizes the exported edge for a microcontroller.
    if ! dpkg -s dataset-fashion-mnist prometheus gcc libc6-dev libzmq3-dev gcc-arm-none-eabi \
            libnewlib-arm-none-eabi >/dev/null 2>&1; then
        echo "I: installing Debian's dataset-fashion-mnist, prometheus, gcc, libzmq3-dev and" \
             "gcc-arm-none-eabi" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist \
            prometheus gcc libc6-dev libzmq3-dev gcc-arm-none-eabi libnewlib-arm-none-eabi \
            >/dev/null
    fi
    if ! python3 -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' \
            2>/dev/null; then
        echo "I: installing torch 2.13.0 (CPU)" >&2
        python3 -m pip install -q torch==2.13.0
    fi
    if ! python3 -c 'import pipeline, pytest, hypothesis, matplotlib, cv2, tqdm, onnxruntime, yaml, importlinter, kubernetes_validate, jsonschema' \
            2>/dev/null \
            || ! command -v splitexit >/dev/null; then
        echo "I: installing splitexit (editable, with the server and dev extras)" >&2
        python3 -m pip install -q -e '.[server,dev]'
    fi
    # The oldest onnxruntime the onnx extra allows, in an environment of its own (it needs
    # numpy < 2): a test runs the ONNX exports with it.
    local ort_oldest="${SPLITEXIT_ORT_OLDEST:-/opt/splitexit-ort-1.17}"
    if ! "$ort_oldest/bin/python" -c 'import onnxruntime' 2>/dev/null; then
        echo "I: installing onnxruntime 1.17.3 into $ort_oldest (for the ONNX export's test)" >&2
        python3 -m venv "$ort_oldest"
        "$ort_oldest/bin/python" -m pip install -q onnxruntime==1.17.3 'numpy<2'
    fi
}

job="${1:-}"
shift || true
case "$job" in
    demo) setup; exec splitexit up "$@" ;;
    test) setup; exec python3 -m pytest -q "$@" ;;
    *) echo "usage: ./run.sh demo|test [ARGS]" >&2; exit 2 ;;
esac
