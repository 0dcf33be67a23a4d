"""t5x_lite: a compact, fast JAX/Flax codebase for encoder-decoder Transformers (T5 family, classic Transformer)."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="t5x_lite",
    version="0.1.0",
    description="T5X with the weight taken off: encoder-decoder Transformers in JAX/Flax",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["t5x_lite", "t5x_lite.*"]),
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2",
        "orbax-checkpoint>=0.12",
        "tensorflow-datasets>=4.9",
        "grain>=0.2",
        "sentencepiece>=0.2",
        "ml-collections>=1.0",
        "sacrebleu>=2.4",
        "sacremoses>=0.1",
        "rouge-score>=0.1.2",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "numpy>=1.26",
        "protobuf>=4",  # sentencepiece model editing (sentinel pieces)
        "qwix>=0.1.8",  # int8 / fp8 quantization of trained models (t5x_lite.quantize)
    ],
    extras_require={
        # torch is pinned: it is a CPU wheel on the build machines; an unpinned torch pulls a multi-GB CUDA build.
        "dev": [
            "pytest>=8",
            "ruff>=0.6",
            "hypothesis>=6",
            "torch==2.13.0",
            "transformers>=5",
            "safetensors>=0.4",
            "submitit>=1.5",  # the sweep's SLURM backend, tested through its LocalExecutor
            "matplotlib>=3.7",  # learning curves and sweep curves
            "gcsfs>=2024.2",  # gs:// workdirs, tested against a local GCS emulator
            "gcp-storage-emulator>=2024.8",
            "pytest-xdist>=3.5",  # make test runs the test files in parallel, one worker per core
            "pytest-rerunfailures>=14",  # reruns the emulator test on the emulator's own sporadic write error
        ],
        "tf": ["tensorflow-cpu"],
        "tpu": ["jax[tpu]"],
        "gpu": ["jax[cuda12]"],
        "gcs": ["gcsfs>=2024.2"],  # --workdir gs://bucket/run (Orbax reads and writes the checkpoints there itself)
        "plot": ["matplotlib>=3.7"],  # learning curves of experiments/translation_report.py and t5x_lite.sweep
        # launching sweeps on clusters (t5x_lite.sweep --backend slurm / skypilot). SkyPilot pins an older click
        # than transformers' hub client wants, so install this extra where you launch from, not with [dev].
        "launch": ["submitit>=1.5", "skypilot>=0.9"],
    },
)
