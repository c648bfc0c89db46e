from setuptools import setup

setup(
    name="fastpeft",
    version="0.1.0",
    description="Triton-kernel accelerated parameter-efficient fine-tuning (LoRA and relatives)",
    python_requires=">=3.10",
    packages=["fastpeft", "fastpeft.kernels"],
    package_dir={"fastpeft": "fastpeft", "fastpeft.kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        "triton>=3.6",
        "safetensors>=0.4",
        # triton 3.6's CPU interpreter (TRITON_INTERPRET=1) breaks with numpy >= 2.4.
        "numpy<2.4",
    ],
    extras_require={
        # Versions the suite is checked against: triton 3.6 is the GPU machine's, and the
        # interpreter and sm_90 compile tests lean on its behaviour; peft 0.21 is the
        # version whose checkpoint format and outputs the interop tests compare with.
        "test": ["pytest>=7", "triton==3.6.0", "peft>=0.21,<0.22", "transformers>=5.17,<6",
                 # the Hugging Face Trainer of examples/finetune.py (tests/test_finetune_example.py)
                 "accelerate>=1.0"],
    },
    entry_points={"console_scripts": ["fastpeft-selfcheck=fastpeft.selfcheck:main"]},
)
