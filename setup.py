"""Build slimtron and its C++ extension slimtron._C (indexed dataset builder, index helpers)."""
import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext = Pybind11Extension(
    "slimtron._C",
    sorted(glob.glob("csrc/*.cpp")),
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=["-O3", "-Wall", "-Wextra", "-Werror=return-type"],
)

setup(
    name="slimtron",
    version="0.1.0",
    description="A readable Megatron-style 3D-parallel pretraining engine for GPT/Llama models",
    packages=find_packages(include=["slimtron", "slimtron.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.10",
    # torch is deliberately unpinned here; install steps put a build of torch in place first
    # (see README) so that pip never pulls a CUDA wheel on a CPU machine.
    # torch 2.7 is the first release whose torch.autograd.backward accepts a GradientEdge (pytorch
    # PR 144744, merged January 2025 after the 2.6 branch cut); the pipeline's backward passes one.
    # Everything the README's tools use: tokenizers (GPT-2 BPE), transformers (HF tokenizers and
    # export), protobuf (sentencepiece's model proto in the HF export), zstandard (.jsonl.zst),
    # tensorboard (--tensorboard-dir). tiktoken (TikTokenizer) and wandb (--wandb-project) are
    # extras of those names; the test extra takes both so that their tests run.
    install_requires=["torch>=2.7", "numpy", "pybind11>=2.10", "sentencepiece", "safetensors",
                      "tokenizers", "transformers", "protobuf", "zstandard", "tensorboard"],
    extras_require={
        "test": ["pytest", "megatron-core", "tiktoken", "wandb"],
        "tiktoken": ["tiktoken"],
        "wandb": ["wandb"],
    },
    zip_safe=False,
)
