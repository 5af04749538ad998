"""tfemde: fast cross-modal retrieval with T-EMDE sketches, slot-attention sets and Smooth-Chamfer (Keras 3)."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def _requirements(name):
    lines = (HERE / name).read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


# The base install is the serving runtime (tfemde.serving, `tfemde embed/index/search`): no TensorFlow. Training,
# evaluation and export need the `train` extra, the whole pinned set of DEPENDENCIES.md.
SERVE_REQUIRES = _requirements("requirements-serve.txt")
TRAIN_REQUIRES = [
    "tensorflow==2.21.0",
    "keras==3.15.1",
    "tensorflow-text==2.21.1",
    "tf2onnx==1.17.0",
    "onnx==1.23.2",
    "tqdm>=4.66",
    "matplotlib>=3.8",
]
# The approximate index (tfemde.serving.ann): FAISS is the well-kept library for the candidate stage.
ANN_REQUIRES = ["faiss-cpu==1.15.1"]
# Serving on NVIDIA GPUs: onnxruntime-gpu replaces the CPU wheel (both fill one `onnxruntime` folder; after
# installing, `tfemde providers` says whether CUDA is there and what to do if not). Its newest release lags the CPU's.
GPU_REQUIRES = ["onnxruntime-gpu==1.31.1"]
# The emoji builders; pinned because the shipped data set's captions come from this emoji release and its Twemoji
# pixels from this CairoSVG (which needs the system's libcairo2).
BUILD_DATA_REQUIRES = ["emoji==2.16.0", "cairosvg==2.9.1"]
TEST_REQUIRES = TRAIN_REQUIRES + ANN_REQUIRES + ["pytest>=8", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"] + BUILD_DATA_REQUIRES

setup(
    name="tfemde",
    version="0.1.0",
    description=__doc__,
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tfemde", "tfemde.*"]),
    package_data={"tfemde": ["data/builtin/*.npz", "data/builtin/NOTICE"]},
    include_package_data=True,
    install_requires=SERVE_REQUIRES,
    extras_require={
        "train": TRAIN_REQUIRES,
        "serve": [],  # the base install; kept so that `tfemde[serve]` still resolves
        "ann": ANN_REQUIRES,
        "gpu": GPU_REQUIRES,
        "test": TEST_REQUIRES,
        "build-data": BUILD_DATA_REQUIRES,
    },
    entry_points={"console_scripts": ["tfemde=tfemde.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "Framework :: Keras"],
)
