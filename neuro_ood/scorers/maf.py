"""Masked Autoregressive Flow scorer (the density model MSMA fits on score-norm vectors)."""

from __future__ import annotations

import numpy as np
import torch
from nflows.distributions.normal import StandardNormal
from nflows.flows.base import Flow
from nflows.transforms.autoregressive import MaskedAffineAutoregressiveTransform
from nflows.transforms.base import CompositeTransform
from nflows.transforms.permutations import ReversePermutation
from sklearn.preprocessing import StandardScaler

from neuro_ood.scorers.base import AuxiliaryScorer, scaler_from_state, scaler_state

_PREFIX = "flow/"


def build_maf(features: int, hidden_features: int, num_layers: int) -> Flow:
    """MAF of ``num_layers`` x (MADE affine transform + reverse permutation) on N(0, I).

    Each MADE has exactly two hidden layers of ``hidden_features`` units, as in MSMA:
    nflows' MADE is ``initial_layer`` (L -> H) -> blocks -> ``final_layer`` (H -> 2L). With
    ``use_residual_blocks=False`` the initial layer is followed by ReLU (hidden layer 1) and
    each ``MaskedFeedforwardBlock`` is one masked H -> H linear + ReLU, so ``num_blocks=1``
    adds hidden layer 2. (The default residual blocks would add two linears per block with a
    skip connection and no activation after the initial layer.)
    """
    layers = []
    for _ in range(num_layers):
        layers.append(MaskedAffineAutoregressiveTransform(
            features=features, hidden_features=hidden_features,
            num_blocks=1, use_residual_blocks=False,
        ))
        layers.append(ReversePermutation(features=features))
    return Flow(CompositeTransform(layers), StandardNormal([features]))


class MAFScorer(AuxiliaryScorer):
    """Standardise, then fit a MAF by maximum likelihood; score = log density.

    Parameters
    ----------
    hidden_features : int
        Units in each of the two hidden layers of every MADE.
    num_layers : int
        Number of MADE transforms.
    epochs : int
        Passes over the shuffled training rows.
    batch_size : int
    lr, weight_decay : float
        Adam settings.
    random_state : int
        Seeds weight initialisation and batch shuffling (global torch RNG state is restored).

    Notes
    -----
    Training runs with one torch thread (restored afterwards): the matrices are tiny, so
    per-op overhead dominates and a second thread only adds contention. Denormals are
    flushed to zero during training (switched off afterwards, torch's default): otherwise
    some parameters decay into the denormal range after ~50 epochs and every later step is
    about 1.5x slower.

    Attributes
    ----------
    scaler_ : StandardScaler
    flow_ : nflows.flows.base.Flow
        Trained flow (float32, CPU, eval mode).
    loss_curve_ : list of float
        Mean negative log-likelihood per epoch (standardised space).
    """

    def __init__(self, hidden_features: int = 128, num_layers: int = 5, epochs: int = 1000,
                 batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 1e-6,
                 random_state: int = 0):
        self.hidden_features = hidden_features
        self.num_layers = num_layers
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.random_state = random_state

    def _build(self) -> Flow:
        return build_maf(self.n_features_in_, self.hidden_features, self.num_layers)

    def fit(self, X, y=None, groups=None) -> "MAFScorer":
        """Train the flow on the standardised rows; ``y`` and ``groups`` are ignored."""
        X = self._check_X(X, reset=True)
        self.scaler_ = StandardScaler().fit(X)
        data = torch.as_tensor(self.scaler_.transform(X), dtype=torch.float32)
        n = data.shape[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state)
            flow = self._build()
        gen = torch.Generator().manual_seed(self.random_state)
        opt = torch.optim.Adam(flow.parameters(), lr=self.lr, weight_decay=self.weight_decay,
                               fused=True)
        flow.train()
        losses = torch.zeros(self.epochs)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        torch.set_flush_denormal(True)
        try:
            for epoch in range(self.epochs):
                for idx in torch.randperm(n, generator=gen).split(self.batch_size):
                    loss = -flow.log_prob(data[idx]).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    losses[epoch] += loss.detach() * len(idx)
        finally:
            torch.set_flush_denormal(False)
            torch.set_num_threads(threads)
        if not torch.isfinite(losses).all():
            raise RuntimeError("MAF training diverged (non-finite loss); try a smaller lr.")
        self.loss_curve_ = (losses / n).tolist()
        self.flow_ = flow.eval()
        return self

    def score_samples(self, X) -> np.ndarray:
        """Log density of the standardised rows under the flow.

        Parameters
        ----------
        X : array-like of shape (N, L)

        Returns
        -------
        ndarray of shape (N,), float64
        """
        Z = torch.as_tensor(self.scaler_.transform(self._check_X(X, reset=False)),
                            dtype=torch.float32)
        with torch.no_grad():
            return self.flow_.log_prob(Z).double().numpy()

    def get_state(self):
        arrays = {_PREFIX + k: v.detach().cpu().numpy() for k, v in self.flow_.state_dict().items()}
        arrays.update(scaler_state(self.scaler_))
        return arrays, self._meta(loss_curve_=[float(v) for v in self.loss_curve_])

    @classmethod
    def from_state(cls, arrays, meta) -> "MAFScorer":
        scorer = cls(**meta["params"])
        scorer.n_features_in_ = int(meta["n_features_in"])
        scorer.scaler_ = scaler_from_state(arrays)
        flow = scorer._build()
        flow.load_state_dict({k[len(_PREFIX):]: torch.from_numpy(np.array(v))
                              for k, v in arrays.items() if k.startswith(_PREFIX)})
        scorer.flow_ = flow.eval()
        scorer.loss_curve_ = list(meta.get("loss_curve_", []))
        return scorer
