"""The optional compiled speed-ups (src/hctserver/native.c).

Everything else is in pyproject.toml. ``optional=True``: where no C
compiler works the build skips the extension and hctserver runs its
pure-Python twins (docs/PERFORMANCE.md, "Native speed-ups").
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "hctserver.native",
            ["src/hctserver/native.c"],
            optional=True,
            extra_compile_args=["-O2"],
        )
    ]
)
