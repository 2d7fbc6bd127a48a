"""What the three tasks share to read data: image decoding, the build-once cache and the synthetic shapes.

Imports OpenCV, so `import backbones` does not import this package.
"""
