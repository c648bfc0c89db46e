from setuptools import find_packages, setup

setup(
    name="fastpeft",
    version="0.1.0",
    description="Triton-kernel accelerated parameter-efficient fine-tuning (LoRA and relatives)",
    python_requires=">=3.10",
    # Every subpackage of fastpeft/ (core, methods/*, serving), plus kernels/ installed
    # as fastpeft.kernels.
    packages=find_packages(include=["fastpeft", "fastpeft.*"], exclude=["fastpeft.kernels"]) + ["fastpeft.kernels"],
    package_dir={"fastpeft": "fastpeft", "fastpeft.kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        "triton>=3.6",
        "safetensors>=0.4",
        # triton 3.6's CPU interpreter (TRITON_INTERPRET=1) breaks with numpy >= 2.4.
        "numpy<2.4",
        "tqdm>=4.60",  # progress bars: benchmarks, fastpeft methods, ServingEngine.generate(progress=True)
    ],
    extras_require={
        # Versions the suite is checked against: triton 3.6 is the GPU machine's, and the
        # interpreter and sm_90 compile tests lean on its behaviour; peft 0.21 is the
        # version whose checkpoint format and outputs the interop tests compare with.
        # matplotlib: `fastpeft plot` (and its test); accelerate: the Hugging Face Trainer of
        # examples/finetune.py (tests/test_finetune_example.py).
        "test": ["pytest>=7", "triton==3.6.0", "peft>=0.21,<0.22", "transformers>=5.17,<6", "matplotlib>=3.7",
                 "accelerate>=1.0"],
        "plot": ["matplotlib>=3.7"],
        # `fastpeft methods` builds models from their configs (on the meta device).
        "cli": ["matplotlib>=3.7", "transformers>=5.17,<6"],
    },
    entry_points={
        "console_scripts": ["fastpeft=fastpeft.cli:main", "fastpeft-selfcheck=fastpeft.selfcheck:main"],
    },
)
