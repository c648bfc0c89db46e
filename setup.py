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
        "test": ["pytest>=7", "peft>=0.17", "transformers>=4.45"],
    },
    entry_points={"console_scripts": ["fastpeft-selfcheck=fastpeft.selfcheck:main"]},
)
