"""ONNX Runtime with idle worker threads spinning or not: one session, and two sessions timed in turns.

    python -m benchmarks.ort_spinning     # the dense MiniLM-MRPC of $KPRUNE_SHARED/models, 2 threads, 53 tokens

The figures behind docs/latency.md's choice of ``session.intra_op.allow_spinning=0`` for sessions
timed in turns (latency tables, their verification, ``kprune bench``).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime

from benchmarks.cases import SHARED_DIR
from kprune_cli.deploy.onnx_model import example_inputs, export_onnx
from kprune_cli.models.loading import load_model
from kprune_cli.tasks.spec import get_task

THREADS, SEQ_LEN, WARMUP = 2, 53, 3


def session(path: Path, spinning: bool) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = THREADS, 1, 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def milliseconds(run: onnxruntime.InferenceSession, feed: dict) -> float:
    start = time.perf_counter()
    run.run(None, feed)
    return 1000.0 * (time.perf_counter() - start)


def main() -> None:
    model, _ = load_model(str(SHARED_DIR / "models" / "minilm-mrpc"), get_task("mrpc"), "cpu")
    path = Path(tempfile.mkdtemp(prefix="kprune-spin-")) / "model.onnx"
    export_onnx(model, path)
    for batch_size, repeats in ((1, 60), (32, 15)):
        feed = {name: tensor.numpy().astype(np.int64)
                for name, tensor in example_inputs(model, batch_size, SEQ_LEN, ragged=False).items()}
        single = {True: session(path, True), False: session(path, False)}
        blocks: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(3):  # blocks of one session's runs, alternating the setting
            for spinning, run in single.items():
                for _ in range(WARMUP):
                    run.run(None, feed)
                blocks[spinning] += [milliseconds(run, feed) for _ in range(repeats)]
        print(f"batch {batch_size}, one session: spinning on {statistics.median(blocks[True]):.2f} ms, "
              f"off {statistics.median(blocks[False]):.2f} ms")
        for spinning in (True, False):
            first, second = session(path, spinning), session(path, spinning)
            for _ in range(WARMUP):
                first.run(None, feed)
                second.run(None, feed)
            times = [(milliseconds(first, feed), milliseconds(second, feed)) for _ in range(repeats)]
            print(f"batch {batch_size}, two sessions in turns, spinning {'on' if spinning else 'off'}: "
                  f"{statistics.median(a for a, _ in times):.2f} / {statistics.median(b for _, b in times):.2f} ms")


if __name__ == "__main__":
    main()
