from setuptools import find_packages, setup

setup(
    name="keras_maskrcnn",
    version="0.2.0",
    description="Mask R-CNN for Keras 3 on TensorFlow: exact RoIAlign, model.fit training, COCO evaluation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["keras_maskrcnn", "keras_maskrcnn.*"]),
    python_requires=">=3.9",
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3.0",
        "numpy",
        "pycocotools",
        "pillow",
    ],
    extras_require={
        "test": ["pytest", "safetensors", "h5py"],
        "convert": ["safetensors"],
    },
    entry_points={"console_scripts": ["keras-maskrcnn=keras_maskrcnn.cli:main"]},
)
