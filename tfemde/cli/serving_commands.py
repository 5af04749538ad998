"""`tfemde embed`, `index`, `search` and `providers`: the commands an export serves with, TensorFlow-free."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tfemde.cli.errors import UserError, out_file
from tfemde.files import atomic_write


def _serving_encoder(args):
    from tfemde.serving import Encoder

    return Encoder.load(args.export_dir, text_route=args.text_route, batch_size=args.batch_size,
                        precision=args.precision)


def _read_lines(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"texts file not found: {path}")
    texts = path.read_text(encoding="utf-8").splitlines()
    if not texts:
        raise UserError(f"texts file {path} is empty; it needs one text per line")
    return texts


def _encode_image_folder(encoder, folder, strict, command, chunk=1024):
    """`(ids, Embeddings)` of the readable images in `folder`, decoded and encoded `chunk` at a time; the others are
    reported on one line and skipped, or with `strict` the first one is the error."""
    import numpy as np

    from tfemde.serving import Embeddings
    from tfemde.serving.images import list_images, load_image

    if encoder.image_size is None:
        raise UserError(f"this export's model takes region features, not images; {command} --images needs an image "
                        "model")
    paths = list_images(folder)
    ids, parts, skipped = [], [], []
    for start in range(0, len(paths), chunk):
        pixels = []
        for path in paths[start:start + chunk]:
            try:
                pixels.append(load_image(path, encoder.image_size))
                ids.append(os.path.basename(path))
            except ValueError as error:
                if strict:
                    raise
                skipped.append(str(error))
        if pixels:
            parts.append(encoder.encode_images(np.stack(pixels)))
    if skipped:
        print(f"tfemde {command}: warning: skipped {len(skipped)} of {len(paths)} images (pass --strict to stop "
              f"instead): {'; '.join(skipped[:3])}{' ...' if len(skipped) > 3 else ''}", file=sys.stderr)
    if not ids:
        raise UserError(f"no readable image in {folder}")
    return ids, Embeddings.concat(parts)


def cmd_embed(args):
    import numpy as np

    out = out_file(args.out)
    encoder = _serving_encoder(args)
    if args.texts:
        ids = _read_lines(args.texts)
        embeddings = encoder.encode_texts(ids)
    else:
        ids, embeddings = _encode_image_folder(encoder, args.images, args.strict, "embed")
    arrays = {"ids": np.asarray(ids, dtype=str), "sets": embeddings.sets}
    if embeddings.sketches is not None:
        arrays.update(sketches=embeddings.sketches, sketch_depth=np.int64(embeddings.sketch_depth))
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to another suffix
            np.savez(f, **arrays)

    atomic_write(out, write)
    sketch = f", sketches [{len(embeddings)}, {embeddings.sketch_dim}]" if embeddings.sketches is not None else ""
    print(f"embedded {len(embeddings)} {'texts' if args.texts else 'images'}: sets {list(embeddings.sets.shape)}"
          f"{sketch} -> {out}")


def _dataset_items(name, split):
    """`(ids, kind, items)` of a data set for `tfemde index --data`: pixels, file paths or region features."""
    import numpy as np

    from tfemde.data import load

    dataset = load(name)
    if split != "all":
        dataset = dataset.split(split)
    if dataset.num_items == 0:
        raise UserError(f"data set {dataset.name!r} has no items in split {split!r}")
    names = dataset.item_names
    if names is not None and len(np.unique(names)) == len(names):
        ids = [str(n) for n in names]
    else:
        ids = [f"{i}" if names is None else f"{i}:{names[i]}" for i in range(dataset.num_items)]
    if dataset.kind == "images":
        return ids, "images", dataset.images
    if dataset.kind == "image_files":
        return ids, "paths", [str(p) for p in dataset.image_paths]
    return ids, "regions", dataset


def _ann_module():
    """`tfemde.serving.ann`, whose indexes need faiss-cpu (the `ann` extra); one line when it is missing."""
    from tfemde.serving import ann

    try:
        ann._faiss()
    except ImportError as error:
        raise UserError(str(error)) from None
    return ann


def _load_index(path):
    """A `SetIndex` file or an `AnnSetIndex` folder, as `tfemde index` wrote it."""
    from tfemde.serving import load_index

    if Path(path).is_dir():
        _ann_module()
    return load_index(path)


def cmd_index(args):
    import numpy as np

    from tfemde.serving import Embeddings, SetIndex

    if args.ann:
        out = Path(args.out)
        ann = _ann_module()
        ann.check_replaceable(out)
        for name, value in (("--neighbours", args.neighbours), ("--refine", args.refine)):
            if value < 1:
                raise UserError(f"{name} must be an int >= 1; got {value}")
    else:
        from tfemde.serving.ann import DEFAULT_NEIGHBOURS

        if args.float16 or args.neighbours != DEFAULT_NEIGHBOURS or args.refine != 1 or args.key != "elements":
            raise UserError("--key, --neighbours, --refine and --float16 are options of an approximate index; add "
                            "--ann auto (or flat, hnsw, ivfpq)")
        out = out_file(args.out)
    encoder = _serving_encoder(args)
    if args.ann:  # built before the encoding, which is the long part, so that a bad argument stops at once
        index = ann.AnnSetIndex(**encoder.similarity_kwargs, key=args.key, factory=args.ann,
                                neighbours=args.neighbours, refine=args.refine,
                                store_dtype="float16" if args.float16 else "float32", export_digest=encoder.export_digest)
    else:
        index = SetIndex(**encoder.similarity_kwargs, export_digest=encoder.export_digest)
    if args.images:
        ids, embeddings = _encode_image_folder(encoder, args.images, args.strict, "index")
    else:
        ids, kind, items = _dataset_items(args.data, args.split)
        if kind == "regions":
            step = 1024  # region features are read from their memory map a chunk at a time
            embeddings = Embeddings.concat([
                encoder.encode_regions(items.region_features(np.arange(i, min(i + step, len(ids)))))
                for i in range(0, len(ids), step)])
        else:
            embeddings = encoder.encode_images(items)
    index.add(embeddings, ids=ids)
    out.parent.mkdir(parents=True, exist_ok=True)
    index.save(out)
    what = f", FAISS {index.factory} over {index.num_keys} keys" if args.ann else ""
    print(f"indexed {len(index)} items (alpha={index.alpha}, sketch_weight={index.sketch_weight}{what}) -> {out}")


def cmd_search(args):
    if args.k < 1:
        raise UserError(f"-k must be >= 1; got {args.k}")
    index = _load_index(args.index)
    encoder = _serving_encoder(args)
    if index.export_digest not in (None, encoder.export_digest) and not args.allow_other_export:
        raise UserError(f"index {args.index} was built with another export than {args.export_dir} (export digest "
                        f"{index.export_digest[:12]}…, this export's {encoder.export_digest[:12]}…): its vectors "
                        "come from another model; rebuild it with `tfemde index`, or pass --allow-other-export")
    if (index.alpha, index.sketch_weight) != (encoder.alpha, encoder.sketch_weight):
        print(f"tfemde search: warning: the index scores with alpha={index.alpha}, sketch_weight="
              f"{index.sketch_weight}; the export's model uses alpha={encoder.alpha}, sketch_weight="
              f"{encoder.sketch_weight}", file=sys.stderr)
    ids, scores = index.search(encoder.encode_texts(args.query), k=args.k)
    for query, row_ids, row_scores in zip(args.query, ids, scores):
        print(f"{query!r}:")
        for rank, (item, score) in enumerate(zip(row_ids, row_scores), 1):
            print(f"  {rank:>3}. {score:8.4f}  {item}")


def cmd_providers(args):
    """The onnxruntime execution providers here, the ones serving would choose, and why CUDA is missing."""
    import onnxruntime as ort

    from tfemde.serving.providers import choose_providers, cuda_problem, installed_onnxruntime_wheels

    available = ort.get_available_providers()
    wheels = installed_onnxruntime_wheels()
    print("onnxruntime wheels: " + (", ".join(f"{name} {version}" for name, version in wheels.items()) or "none"))
    print("available providers: " + ", ".join(available))
    print("serving uses: " + ", ".join(choose_providers(available)))
    problem = cuda_problem(available, wheels)
    if problem:
        print(f"tfemde providers: warning: {problem}", file=sys.stderr)
        return 1
    return 0
