"""How fast does the exported model serve? onnxruntime vs the TensorFlow SavedModel, and the retrieval scoring.

The DivE configuration (preset `dive`: 36 x 2048 region features, 12-token captions, K = 4 slots of D = 1024;
untrained weights, which cost the same as trained ones) is exported with `tfemde.export.export_run`, then:

* per-call latency (median over repeated calls after warm-up) and items/s of `image.onnx` / `text.onnx` in
  onnxruntime (the `Encoder`'s sessions) and of the SavedModel's `encode_image` / `encode_text` signatures (inputs
  already tensors), at batch 1, 8 and 128, timed in alternating rounds in one process so that a shared machine's
  background load hits both alike;
* the text graph with its BiGRU as onnxruntime's `GRU` kernel (float32) and tfemde's lean `Scan` (int8), the
  default export, beside the same model exported with `native_rnn=False` (tf2onnx's `Loop`s), in the same rounds;
* single-caption latency of the whole text path in a TensorFlow-free process: `Encoder.encode_texts`
  (sentencepiece + text.onnx) and `text_e2e.onnx` on a string;
* the memory-traffic floor of one item (`benchmarks/weight_traffic.py`): the weights each graph reads per call and
  the rate batch-1 products stream weights here, so the fastest any graph of this model could be, and the most
  any could gain on the reference;
* the time to score 5,000 image sets against 25,000 caption sets with `tfemde.serving.similarity`, next to the
  bare matrix multiply it needs (benchmarks/scoring.py measures this in more detail).

Targets (issues 5 and 16): onnxruntime float32 >= 4x and int8 >= 8x faster per single item than the official
PyTorch code (kdwonn/DivE) on the same machine, and >= 2x faster than the SavedModel at batch 1; the scoring <= 30 s
and <= 1.3x the matrix multiply (PyTorch: 61 s).

The reference is measured side by side when `--reference-command` names a program that times the official code
here and prints one JSON line with `image_ms` and `text_ms` (per item, batch 1): it runs before and after the
timings above and the mean of its two runs is the reference. The project ships no such program (the official code
is not ours to ship); without one the benchmark quotes `REFERENCE_MS`, measured that way on the machine
`REFERENCE_MACHINE` names.

    python benchmarks/serving.py            # everything (several minutes on 2 cores)
    python benchmarks/serving.py --quick    # fewer repeats, 1,000 x 5,000 scoring
    python benchmarks/serving.py --reference-command "/path/to/python /path/to/peer_bench.py"
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

BATCHES = (1, 8, 128)
TOKENS = 12
REGIONS, REGION_DIM = 36, 2048
# The official PyTorch encoders (kdwonn/DivE at f59bc1c, its COCO bottom-up BiGRU configuration, eval mode under
# torch.inference_mode, torch 2.13.0 CPU, 2 threads), mean of the runs before and after this benchmark's timings.
REFERENCE_MS = {"image": 18.8, "text": 16.5}
REFERENCE_MACHINE = ("Intel Xeon 2 cores with AVX-512, VNNI and AMX, 2026-12-06 (before / after: image 17.3 / 20.3 ms, "
                     "text 15.2 / 17.8 ms; one thread 33.1 / 29.9 ms; earlier sessions quoted 41 / 34 ms)")
PYTORCH_SCORING_S = 61.0


def _inputs(batch, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    regions = rng.normal(size=(batch, REGIONS, REGION_DIM)).astype(np.float32)
    region_mask = np.ones((batch, REGIONS), bool)
    ids = rng.integers(3, 400, size=(batch, TOKENS)).astype(np.int32)
    return {"regions": regions, "region_mask": region_mask}, {"caption_ids": ids,
                                                              "caption_mask": np.ones((batch, TOKENS), bool)}


# ---------------------------------------------------------------------------------------------- parts
def part_export(out_dir, loop_dir):
    """Build the untrained DivE model and export it twice (TensorFlow): as shipped, and with tf2onnx's Loops."""
    import numpy as np

    from tfemde.export import export_run
    from tfemde.models import build_dual_encoder
    from tfemde.text import Tokenizer

    rng = np.random.default_rng(0)
    words = ("a man woman child dog cat horse red blue green small large standing sitting riding playing with on in "
             "the of near street beach field table plate pizza train bus car tennis ball frisbee kite").split()
    tokenizer = Tokenizer.train([" ".join(rng.choice(words, size=rng.integers(5, 15))) for _ in range(3000)],
                                vocab_size=60)
    model = build_dual_encoder("dive", image_input="regions", num_regions=REGIONS, region_dim=REGION_DIM,
                               embed_dim=1024, num_slots=4, vocab_size=10000, max_length=32)
    started = time.perf_counter()
    export_run(model, out_dir, tokenizer=tokenizer, quantize=True)
    seconds = time.perf_counter() - started
    export_run(model, loop_dir, tokenizer=tokenizer, quantize=True, native_rnn=False)
    return {"export_seconds": seconds, "params": int(model.count_params())}


class _OrtRunner:
    """The onnxruntime side, TensorFlow-free, as an application runs it: the `Encoder`'s sessions."""

    def __init__(self, export_dir, loop_dir):
        import onnxruntime

        from tfemde.serving import Encoder

        assert "tensorflow" not in sys.modules
        self.encoder = Encoder.load(export_dir)
        self.loop = Encoder.load(loop_dir)
        self.loop_int8 = Encoder.load(loop_dir, precision="int8")
        self.single = Encoder.load(export_dir, threads=1)
        self.int8 = Encoder.load(export_dir, precision="int8")
        self.e2e = Encoder.load(export_dir, text_route="e2e")
        self.caption = ["a man riding a red horse on the beach near a small dog"]
        self.info = {"providers": self.encoder.providers, "onnxruntime": onnxruntime.__version__,
                     "tokens_in_caption": int(self.encoder.tokenize(self.caption)[1].sum()),
                     "int8_files": sorted(self.int8._files.values())}

    def call(self, what, batch, variant):
        if what == "encode_texts":
            return lambda: (self.e2e if variant == "e2e" else self.encoder).encode_texts(self.caption)
        encoder = {"threads1": self.single, "int8": self.int8, "loop": self.loop,
                   "loop_int8": self.loop_int8}.get(variant, self.encoder)
        session = encoder._session(f"{what}.onnx")
        feeds = _inputs(batch)[0 if what == "image" else 1]
        return lambda: session.run(["set"], feeds)


class _TfRunner:
    """The SavedModel side: `encode_image` / `encode_text` signatures called with tensors."""

    def __init__(self, export_dir, loop_dir):
        import tensorflow as tf

        self.tf = tf
        loaded = tf.saved_model.load(os.path.join(export_dir, "saved_model"))
        self.signatures = {"image": loaded.signatures["encode_image"], "text": loaded.signatures["encode_text"]}
        self.info = {"tensorflow": tf.__version__}

    def call(self, what, batch, variant):
        feeds = {k: self.tf.constant(v) for k, v in _inputs(batch)[0 if what == "image" else 1].items()}
        signature = self.signatures[what]
        return lambda: signature(**feeds)["set"].numpy()


def part_worker(kind, export_dir, loop_dir):
    """A timing worker: one JSON command per stdin line, `{"what", "batch", "variant", "seconds"}`, answered
    with the per-call seconds of as many calls as fit (at least 2, after 2 warm-up calls per new case)."""
    runner = (_OrtRunner if kind == "ort" else _TfRunner)(export_dir, loop_dir)
    print(json.dumps(runner.info), flush=True)
    calls = {}
    for line in sys.stdin:
        command = json.loads(line)
        key = (command["what"], command["batch"], command["variant"])
        if key not in calls:
            calls[key] = runner.call(*key)
            for _ in range(2):
                calls[key]()
        fn, times, started = calls[key], [], time.perf_counter()
        while len(times) < 2 or (time.perf_counter() - started < command["seconds"] and len(times) < 200):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        print(json.dumps(times), flush=True)


def manifest_cosines(export_dir):
    """The int8 graphs' smallest cosine to TensorFlow, as the export measured it: `"image 0.9998, text 0.9999"`."""
    with open(os.path.join(export_dir, "manifest.json"), encoding="utf-8") as f:
        quantized = json.load(f).get("quantized")
    if not quantized:
        raise SystemExit(f"{export_dir} has no int8 graphs; export it with quantize=True (tfemde export --quantize)")
    return ", ".join(f"{what} {quantized[what]['min_cosine']:.4f}" for what in ("image", "text"))


class _Workers:
    """The two timing workers (separate processes, so neither runtime's threads disturb the other), driven in
    alternating rounds: background load on a shared machine then hits both alike and their ratio stays fair."""

    def __init__(self, export_dir, loop_dir):
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.procs = {kind: subprocess.Popen([sys.executable, os.path.abspath(__file__), "--part", f"worker_{kind}",
                                              export_dir, loop_dir], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=subprocess.DEVNULL, text=True, env=env)
                      for kind in ("ort", "tf")}
        self.info = {}
        for kind, proc in self.procs.items():
            line = proc.stdout.readline()
            if not line:
                raise SystemExit(f"the {kind} timing worker failed to start (run it alone: python "
                                 f"benchmarks/serving.py --part worker_{kind} {export_dir} {loop_dir})")
            self.info.update(json.loads(line))

    def ask(self, kind, what, batch, variant, seconds):
        proc = self.procs[kind]
        proc.stdin.write(json.dumps({"what": what, "batch": batch, "variant": variant, "seconds": seconds}) + "\n")
        proc.stdin.flush()
        return json.loads(proc.stdout.readline())

    def compare(self, cases, quick):
        """Median seconds per call of every `(kind, what, batch, variant)` case, over alternating rounds."""
        times = {case: [] for case in cases}
        for _ in range(2 if quick else 5):
            for case in cases:
                times[case].extend(self.ask(*case, seconds=0.2 if quick else 0.6))
        return {case: statistics.median(v) for case, v in times.items()}

    def close(self):
        for proc in self.procs.values():
            proc.stdin.close()
            proc.wait(timeout=60)


def part_scoring(quick):
    """5,000 x 25,000 (1,000 x 5,000 with --quick) Smooth-Chamfer scoring vs its bare matrix multiply."""
    import numpy as np

    from scoring import matmul_reference, timed_similarity, unit_sets  # benchmarks/scoring.py

    from tfemde.serving import Embeddings

    n_images = 1000 if quick else 5000
    rng = np.random.default_rng(0)
    images = Embeddings(unit_sets(rng, n_images, 4, 1024))
    captions = Embeddings(unit_sets(rng, 5 * n_images, 4, 1024))
    matmul, _ = matmul_reference(images.sets, captions.sets)
    _, seconds, _, _ = timed_similarity(images, captions, 0.0)
    return {"images": n_images, "captions": 5 * n_images, "score_seconds": seconds, "matmul_seconds": matmul}


def reference_run(command):
    """`{"image_ms", "text_ms"}` printed (last line, JSON) by the reference program `command` (a shell command)."""
    done = subprocess.run(command, shell=True, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
        return {what: float(result[f"{what}_ms"]) for what in ("image", "text")}
    except (IndexError, ValueError, KeyError, TypeError):
        raise SystemExit(f"--reference-command {command!r} must print a JSON line with image_ms and text_ms as its "
                         f"last line; it exited with {done.returncode} and printed {done.stdout[-300:]!r} "
                         f"{done.stderr[-300:]!r}") from None


def part_floor(export_dir, int8_files):
    """Weights read per item by the graphs `Encoder` runs, and the machine's streaming rates (weight_traffic.py)."""
    from weight_traffic import streaming_rates, weight_reads  # benchmarks/weight_traffic.py

    files = {"ort": {what: f"{what}.onnx" for what in ("image", "text")},
             "int8": {name.split(".")[0]: name for name in int8_files}}
    reads = {variant: {what: sum(weight_reads(os.path.join(export_dir, name), TOKENS).values())
                       for what, name in names.items()} for variant, names in files.items()}
    return {"reads": reads, "rates": streaming_rates()}


def _run_part(name, *args):
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--part", name, *args], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"part {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- report
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter timings, 1,000 x 5,000 scoring")
    parser.add_argument("--export", nargs=2, metavar=("EXPORT", "LOOP_EXPORT"),
                        help="reuse these export folders, the second exported with native_rnn=False (default: "
                             "export into a temporary folder)")
    parser.add_argument("--skip-scoring", action="store_true")
    parser.add_argument("--reference-command", metavar="COMMAND",
                        help="a shell command that times the official PyTorch encoders on this machine and prints "
                             "a JSON line with image_ms and text_ms (per item, batch 1); run before and after")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        if args.part.startswith("worker_"):
            return part_worker(args.part[len("worker_"):], *args.args[:2])
        fn = {"export": lambda: part_export(*args.args[:2]),
              "floor": lambda: part_floor(args.args[0], args.args[1:])}[args.part]
        print(json.dumps(fn()))
        return
    from _machine import describe

    print(f"tfemde serving benchmark; machine: {describe()}")
    before = reference_run(args.reference_command) if args.reference_command else None
    with tempfile.TemporaryDirectory(prefix="tfemde-bench-") as tmp:
        export_dir, loop_dir = args.export or (os.path.join(tmp, "export"), os.path.join(tmp, "export_loop"))
        if not args.export:
            info = _run_part("export", export_dir, loop_dir)
            print(f"DivE (untrained, {info['params'] / 1e6:.1f} M parameters; regions {REGIONS}x{REGION_DIM}, "
                  f"{TOKENS}-token captions, K=4, D=1024) exported and checked in {info['export_seconds']:.0f} s")
        cosines = manifest_cosines(export_dir)
        workers = _Workers(export_dir, loop_dir)
        try:
            cases = [(kind, what, batch, "default") for what in ("image", "text") for batch in BATCHES
                     for kind in ("ort", "tf")]
            cases += [("ort", what, 1, "threads1") for what in ("image", "text")]
            cases += [("ort", what, batch, "int8") for what in ("image", "text") for batch in BATCHES]
            cases += [("ort", "text", batch, variant) for batch in BATCHES for variant in ("loop", "loop_int8")]
            cases += [("ort", "encode_texts", 1, variant) for variant in ("sentencepiece", "e2e")]
            measured = workers.compare(cases, args.quick)
        finally:
            workers.close()
        floor = _run_part("floor", export_dir, *workers.info["int8_files"])
    times = {**workers.info, **{f"{kind}/{what}/{batch}": v for (kind, what, batch, variant), v in measured.items()
                                if variant == "default"},
             **{f"{variant}/{what}/{batch}": v for (kind, what, batch, variant), v in measured.items()
                if variant in ("int8", "loop", "loop_int8")},
             "ort1/image/1": measured[("ort", "image", 1, "threads1")],
             "ort1/text/1": measured[("ort", "text", 1, "threads1")]}
    paths = {"tokens_in_caption": workers.info["tokens_in_caption"],
             "encode_texts/1": measured[("ort", "encode_texts", 1, "sentencepiece")],
             "text_e2e/1": measured[("ort", "encode_texts", 1, "e2e")]}
    print(f"onnxruntime {times['onnxruntime']} {times['providers']} (Encoder defaults: a thread per core, "
          f"spin-waiting only during a call) vs the SavedModel on TensorFlow {times['tensorflow']}; median per call, the two timed in "
          "alternating rounds after warm-up")
    print()
    header = (f"{'encoder':<8}{'batch':>6}{'ORT ms/call':>13}{'ORT items/s':>13}{'TF ms/call':>12}"
              f"{'TF items/s':>12}{'TF/ORT':>8}")
    print(header)
    print("-" * len(header))
    for what in ("image", "text"):
        for batch in BATCHES:
            o, t = times[f"ort/{what}/{batch}"], times[f"tf/{what}/{batch}"]
            print(f"{what:<8}{batch:>6}{1000 * o:>13.2f}{batch / o:>13.0f}{1000 * t:>12.2f}{batch / t:>12.0f}"
                  f"{t / o:>8.2f}")
    print("-" * len(header))
    print(f"int8 export (Encoder precision='int8' runs {', '.join(times['int8_files'])} on this CPU; cosine to TF "
          f">= {cosines}):")
    for what in ("image", "text"):
        cells = []
        for b in BATCHES:
            fast, exact = times[f"int8/{what}/{b}"], times[f"ort/{what}/{b}"]
            cells.append(f"batch {b} {1000 * fast:.2f} ms ({exact / fast:.2f}x float32)")
        print(f"  {what}: " + ", ".join(cells))
    cells = [f"batch {b} {1000 * times[f'loop/text/{b}']:.2f} ms (GRU kernel "
             f"{times[f'loop/text/{b}'] / times[f'ort/text/{b}']:.2f}x faster)" for b in BATCHES]
    print("text float32 with tf2onnx's Loops (native_rnn=False): " + ", ".join(cells))
    cells = [f"batch {b} {1000 * times[f'loop_int8/text/{b}']:.2f} ms (lean Scan "
             f"{times[f'loop_int8/text/{b}'] / times[f'int8/text/{b}']:.2f}x faster)" for b in BATCHES]
    print("text int8 quantized from tf2onnx's Loops (native_rnn=False): " + ", ".join(cells))
    print(f"batch 1 with one onnxruntime thread: image {1000 * times['ort1/image/1']:.2f} ms, text "
          f"{1000 * times['ort1/text/1']:.2f} ms")
    print(f"one caption end to end ({paths['tokens_in_caption']} tokens, TensorFlow-free): Encoder.encode_texts "
          f"(sentencepiece + text.onnx) {1000 * paths['encode_texts/1']:.2f} ms; text_e2e.onnx "
          f"{1000 * paths['text_e2e/1']:.2f} ms")
    print()
    if before:
        after = reference_run(args.reference_command)
        reference = {what: (before[what] + after[what]) / 2 for what in ("image", "text")}
        print(f"official PyTorch code, measured here ({args.reference_command}), before / after the timings: image "
              f"{before['image']:.1f} / {after['image']:.1f} ms, text {before['text']:.1f} / {after['text']:.1f} ms "
              f"per item at batch 1")
    else:
        reference = REFERENCE_MS
        print(f"official PyTorch code, quoted (no --reference-command): image {reference['image']:.1f} ms, text "
              f"{reference['text']:.1f} ms per item at batch 1, measured side by side on {REFERENCE_MACHINE}")
    rates = floor["rates"]
    least = {variant: {what: floor["reads"][variant][what] / (rates["float32" if variant == "ort" else "int8"] * 1e6)
                       for what in ("image", "text")} for variant in ("ort", "int8")}
    print(f"memory-traffic floor at batch 1 (benchmarks/weight_traffic.py): batch-1 products stream weights at "
          f"{rates['float32']:.1f} GB/s float32 and {rates['int8']:.1f} GB/s int8 here; a call reads each weight once "
          f"per use ({TOKENS} steps of the recurrence), so no graph of this model can take less than:")
    for what in ("image", "text"):
        cells = [f"{label} {floor['reads'][variant][what] / 1e6:.0f} MB -> {least[variant][what]:.2f} ms (measured "
                 f"{1000 * times[f'{variant}/{what}/1'] / least[variant][what]:.2f}x that; at most "
                 f"{reference[what] / least[variant][what]:.1f}x the reference)"
                 for variant, label in (("ort", "float32"), ("int8", "int8"))]
        print(f"  {what}: " + "; ".join(cells))
    print()
    checks = []
    for what in ("image", "text"):
        for variant, label, factor in (("ort", "ORT float32", 4), ("int8", "ORT int8", 8)):
            ms = 1000 * times[f"{variant}/{what}/1"]
            checks.append((f"{what}: {label} per single item <= {reference[what] / factor:.2f} ms ({factor}x "
                           f"faster than PyTorch's {reference[what]:.1f} ms)", ms <= reference[what] / factor,
                           f"{ms:.2f} ms, {reference[what] / ms:.1f}x (the memory-traffic floor allows "
                           f"{reference[what] / least[variant][what]:.1f}x)"))
            ratio = times[f"tf/{what}/1"] / times[f"{variant}/{what}/1"]
            checks.append((f"{what}: {label} >= 2x faster than the SavedModel at batch 1", ratio >= 2.0,
                           f"{ratio:.2f}x"))
    if not args.skip_scoring:
        score = part_scoring(args.quick)
        ratio = score["score_seconds"] / score["matmul_seconds"]
        print(f"scoring {score['images']} image sets x {score['captions']} caption sets (K=4, D=1024, "
              f"alpha=16): similarity {score['score_seconds']:.1f} s, bare matmul {score['matmul_seconds']:.1f} s, "
              f"ratio {ratio:.2f} (PyTorch DivE: {PYTORCH_SCORING_S:.0f} s for 5,000 x 25,000)")
        if not args.quick:
            checks.append(("scoring 5,000 x 25,000 <= 30 s", score["score_seconds"] <= 30,
                           f"{score['score_seconds']:.1f} s"))
            checks.append(("scoring <= 1.3x its matrix multiply", ratio <= 1.3, f"{ratio:.2f}x"))
        print()
    for text, ok, value in checks:
        print(f"[{'met' if ok else 'MISSED'}] {text}: {value}")


if __name__ == "__main__":
    main()
