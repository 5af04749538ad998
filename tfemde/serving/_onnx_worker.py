"""Runs ONNX graphs on given inputs in a TensorFlow-free process: the onnxruntime half of the export check.

`python -m tfemde.serving._onnx_worker WORK_DIR` reads `WORK_DIR/job.json`, a list of
`{"model": path, "feeds": npz, "outputs": npz, "custom_ops": bool}`, runs each graph on the CPU provider and writes
its outputs (by name) to the `outputs` npz. `tfemde.export` calls it in a subprocess because registering the
onnxruntime-extensions op library in a process that has imported TensorFlow crashes that process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from tfemde.serving.providers import CPU, make_session


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    work = Path(argv[0])
    sessions = {}
    for entry in json.loads((work / "job.json").read_text()):
        key = (entry["model"], entry["custom_ops"])
        if key not in sessions:
            sessions[key] = make_session(entry["model"], providers=[CPU], custom_ops=entry["custom_ops"])
        session = sessions[key]
        with np.load(work / entry["feeds"], allow_pickle=False) as z:
            feeds = {k: (z[k].astype(object) if z[k].dtype.kind == "U" else z[k]) for k in z.files}
        names = [o.name for o in session.get_outputs()]
        values = session.run(names, feeds)
        np.savez(work / entry["outputs"], **dict(zip(names, values)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
