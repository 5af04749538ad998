"""Export a trained run's encoders: ONNX (image, text, text end to end), SavedModel, tokenizer and manifest.

    python export/export_encoders.py RUN_DIR OUT_DIR [--opset 17] [--quantize]

The same as `tfemde export RUN_DIR --out OUT_DIR`, with every option of that command (passed on as given). The export checks itself against TensorFlow before it is moved
into OUT_DIR (see `tfemde.export`); serve it with `tfemde.serving.Encoder.load(OUT_DIR)` or `export/serve_app.py`.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run folder (config.json, tokenizer.model, best.keras)")
    parser.add_argument("out_dir", help="the export folder to write (an earlier export there is replaced)")
    parser.epilog = "Any other option is one of `tfemde export`'s (--opset, --quantize), passed on unchanged."
    args, options = parser.parse_known_args(argv)

    from tfemde.cli import main as cli_main

    return cli_main(["export", args.run_dir, "--out", args.out_dir, *options])


if __name__ == "__main__":
    sys.exit(main())
