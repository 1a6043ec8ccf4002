"""Model-agnostic analyses of what a likelihood model responds to.

:mod:`neuro_ood.analysis.fourier`: the Fourier amplitude/phase mixing analysis of Schirrmeister
et al. (NeurIPS 2020, supplement S3).
"""

from __future__ import annotations

from neuro_ood.analysis.fourier import (
    FourierMixResult,
    amplitude_phase_pairs,
    fourier_likelihood_analysis,
    mix_amplitude_phase,
)

__all__ = ["FourierMixResult", "amplitude_phase_pairs", "fourier_likelihood_analysis",
           "mix_amplitude_phase"]
