"""The kernels: ternary operators in TE, our attention kernels, and the schedule rules per target family."""
