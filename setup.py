"""ppcls_ft: fine-tune pretrained PaddleClas image classifiers (pip install -e .[cpu])."""
from setuptools import find_packages, setup

setup(
    name="ppcls_ft",
    version="0.1.0",
    description="Fine-tune pretrained PaddleClas image classifiers: PaddleClas configs and weights, "
                "correct loading, fast CPU paths, export for paddle-inference",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ppcls_ft", "ppcls_ft.*"]),
    include_package_data=True,
    install_requires=[
        "numpy>=1.23",
        "pyyaml>=6.0",
        "opencv-python-headless>=4.6",
        "Pillow>=9.0",
        "visualdl>=2.5",
        "matplotlib>=3.5",  # report.html and confusion_matrix.png
    ],
    # Paddle is an extra so a GPU user is not forced onto the CPU wheel:
    #   pip install -e .[cpu]   or   pip install -e .[gpu] (paddlepaddle-gpu from Paddle's index)
    # The CPU extra carries ONNX Runtime and paddle2onnx: the export certifies and times it beside
    # paddle-inference and the Predictor serves with the faster (up to 2x on the mobile models,
    # docs/benchmarks/inference_speed.md). onnx_graphsurgeon: paddle2onnx's constant folding needs it.
    extras_require={
        "cpu": ["paddlepaddle==3.3.1", "paddle2onnx>=2.0", "onnxruntime>=1.16", "onnx_graphsurgeon>=0.3.27"],
        "gpu": ["paddlepaddle-gpu==3.3.1"],
        "onnx": ["paddle2onnx>=2.0", "onnxruntime>=1.16", "onnx_graphsurgeon>=0.3.27"],
        # The HTTP service (deploy/serve.py): pip install -e .[serve]
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "python-multipart>=0.0.9"],
        # httpx: the tests talk to a real server; pytest-xdist: make test runs two test processes
        # (most tests wait on a subprocess or a Python import, so two fit on two cores);
        # make test installs .[cpu,test,serve]
        "test": ["pytest>=7", "httpx>=0.27", "pytest-xdist>=3"],
    },
)
