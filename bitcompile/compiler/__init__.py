"""The compiler: targets and toolchains, the build pipeline, tuning and its records."""
