"""ilvr_toolkit: domain DDPMs and ILVR image translation (Choi et al., ICCV 2021)."""

__version__ = "0.1.0"
