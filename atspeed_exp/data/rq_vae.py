"""Semantic IDs from a residual-quantised variational autoencoder (RQ-VAE, as in TIGER and LC-Rec): an MLP
autoencoder over the item embeddings whose latent passes through one codebook per level.

Contract of ``train_rq_vae`` (torch only; on the CPU a seed gives the same codes):

- network: encoder MLP ``D -> hidden_sizes -> latent_dim``, decoder its mirror ``latent_dim -> reversed(hidden_sizes)
  -> D`` (ReLU between layers, none after the last); codebook l is a ``[C_l, latent_dim]`` matrix;
- quantisation: level l takes the residual ``r_l`` (``r_0 = z = encoder(x)``), picks ``code_l = argmin_c ||r_l -
  e_c||^2`` (ties to the lower index) and passes ``r_{l+1} = r_l - sg(e_code)`` on; the decoder reads
  ``z_q = sum_l e_{code_l}`` through the straight-through estimator ``z + sg(z_q - z)``, so the reconstruction
  gradient reaches the encoder as if there were no quantiser (``sg``: stop-gradient);
- loss per batch: ``mean((x - decoder(.))^2) + mean over levels of [mean((sg(r_l) - e)^2) + beta mean((r_l -
  sg(e))^2)]``, the codebook loss moving each codebook towards its inputs and the commitment loss keeping the
  encoder near its codes (VQ-VAE);
- init: under ``seed``, the network from the global RNG (forked: the caller's RNG state is left as it was); with
  ``kmeans_init`` each codebook is then set to the residual k-means centroids (``sid_build.residual_kmeans``,
  ``kmeans_iters``, the same seed) of the untrained encoder's latents of all items, so no code starts dead;
- training: Adam over ``epochs`` passes of shuffled minibatches (a seeded ``torch.Generator``), float32;
- result: every item's codes under the trained network, with the last level's inputs and codebook for the
  collision handling of ``sid_build.handle_collisions``, and facts for the report (the reconstruction loss after
  init and after training, a loss history, codes used per level after init and after training).

Why a plain loop and not a LightningModule: the whole training set is one in-memory ``[N, D]`` tensor trained in
seconds to minutes, with no validation split, no checkpoint worth resuming and one device; a Trainer would add log
and checkpoint folders and global seeding, and the step is called from ``python -m atspeed_exp.prepare``, which has
no trainer settings.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from atspeed_exp.data.sid_build import check_sid_settings, handle_collisions, residual_kmeans

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RQVAESettings:
    """What ``train_rq_vae`` trains (module docstring); every field is recorded in the SID report."""

    hidden_sizes: tuple[int, ...] = (512, 256, 128)
    latent_dim: int = 32
    epochs: int = 1000
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.0
    beta: float = 0.25
    kmeans_init: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_sizes", tuple(int(h) for h in self.hidden_sizes))
        if any(h < 1 for h in self.hidden_sizes) or self.latent_dim < 1:
            raise ValueError(f"hidden_sizes and latent_dim must be >= 1, got {list(self.hidden_sizes)}, "
                             f"{self.latent_dim}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if not self.lr > 0 or self.weight_decay < 0 or self.beta < 0:
            raise ValueError(f"lr must be > 0, weight_decay and beta >= 0, got {self.lr}, {self.weight_decay}, "
                             f"{self.beta}")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None, key: str = "rq_vae") -> RQVAESettings:
        """From a config mapping (missing keys take the defaults); unknown keys and bad values name ``key``."""
        values = dict(values or {})
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{key}: unknown keys {unknown}; expected some of "
                             f"{[f.name for f in dataclasses.fields(cls)]}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{key}: {error}") from None

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "hidden_sizes": list(self.hidden_sizes)}


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers ``sizes[0] -> sizes[1] -> ...`` with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    """Encoder, residual codebooks and decoder (module docstring)."""

    def __init__(self, input_dim: int, hidden_sizes: Sequence[int], latent_dim: int, codebook_sizes: Sequence[int],
                 beta: float = 0.25) -> None:
        super().__init__()
        self.encoder = mlp([input_dim, *hidden_sizes, latent_dim])
        self.decoder = mlp([latent_dim, *reversed(hidden_sizes), input_dim])
        self.codebooks = nn.ParameterList(
            nn.Parameter(torch.empty(int(size), latent_dim).uniform_(-1.0 / size, 1.0 / size))
            for size in codebook_sizes)
        self.beta = beta

    def quantise(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """z [B, d] -> (z_q [B, d] the sum of the chosen code vectors, codes [B, L], the codebook + commitment loss
        averaged over levels, each level's input residual [B, d])."""
        residual = z
        z_q = torch.zeros_like(z)
        codes, losses, inputs = [], [], []
        for codebook in self.codebooks:
            inputs.append(residual)
            code = torch.cdist(residual.detach(), codebook.detach()).argmin(dim=1)  # [B]
            vector = codebook[code]  # [B, d]
            losses.append(F.mse_loss(vector, residual.detach()) + self.beta * F.mse_loss(residual, vector.detach()))
            codes.append(code)
            z_q = z_q + vector.detach()
            residual = residual - vector.detach()
        return z_q, torch.stack(codes, dim=1), torch.stack(losses).mean(), inputs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, D] -> (reconstruction [B, D], codes [B, L], quantisation loss)."""
        z = self.encoder(x)
        z_q, codes, quant_loss, _ = self.quantise(z)
        return self.decoder(z + (z_q - z).detach()), codes, quant_loss  # straight-through

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor, iters: int, seed: int) -> None:
        """Each codebook <- residual k-means centroids of the encoder's latents of ``x`` (a codebook larger than
        the number of items keeps its other rows)."""
        sizes = [c.shape[0] for c in self.codebooks]
        _, centroids, _ = residual_kmeans(self.encoder(x).double(), sizes, iters, seed)
        for codebook, found in zip(self.codebooks, centroids):
            codebook[: found.shape[0]] = found.to(codebook.dtype)


def _reconstruction(model: RQVAE, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.mse_loss(model(x)[0], x))


def _codes_used(codes: torch.Tensor) -> list[int]:
    return [int(torch.unique(codes[:, level]).numel()) for level in range(codes.shape[1])]


def train_rq_vae(
    embeddings: torch.Tensor, codebook_sizes: Sequence[int], settings: RQVAESettings = RQVAESettings(),
    seed: int = 0, kmeans_iters: int = 100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Train an RQ-VAE on ``embeddings`` [N, D] (module docstring). Returns (codes [N, L], the last level's input
    residuals [N, d] and its codebook [C_L, d], both float64, and training facts)."""
    x = embeddings.to(torch.float32)
    n = x.shape[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RQVAE(x.shape[1], settings.hidden_sizes, settings.latent_dim, codebook_sizes, settings.beta)
    if settings.kmeans_init:
        model.init_codebooks(x, kmeans_iters, seed)
    with torch.no_grad():
        init_codes = model.quantise(model.encoder(x))[1]
    facts: dict[str, Any] = {"recon_loss_init": _reconstruction(model, x), "codes_used_init": _codes_used(init_codes)}
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    every = max(1, settings.epochs // 20)
    history = []
    for epoch in range(1, settings.epochs + 1):
        order = torch.randperm(n, generator=generator)
        recon_sum = quant_sum = 0.0
        for start in range(0, n, settings.batch_size):
            batch = x[order[start : start + settings.batch_size]]
            output, _, quant_loss = model(batch)
            recon = F.mse_loss(output, batch)
            optimizer.zero_grad(set_to_none=True)
            (recon + quant_loss).backward()
            optimizer.step()
            recon_sum += recon.detach().item() * len(batch)
            quant_sum += quant_loss.detach().item() * len(batch)
        if epoch % every == 0 or epoch == 1 or epoch == settings.epochs:
            history.append({"epoch": epoch, "recon_loss": recon_sum / n, "quant_loss": quant_sum / n})
            logger.debug("rq_vae epoch %d: recon %.5f quant %.5f", epoch, recon_sum / n, quant_sum / n)
    model.eval()
    with torch.no_grad():
        _, codes, quant_loss, inputs = model.quantise(model.encoder(x))
    facts.update(recon_loss_final=_reconstruction(model, x), quant_loss_final=float(quant_loss),
                 codes_used_final=_codes_used(codes), history=history)
    logger.info("rq_vae: %d epochs, reconstruction loss %.5f -> %.5f, codes used per level %s", settings.epochs,
                facts["recon_loss_init"], facts["recon_loss_final"], facts["codes_used_final"])
    return codes, inputs[-1].double(), model.codebooks[-1].detach().double(), facts


def rq_vae_sids(
    embeddings: torch.Tensor, codebook_sizes: Sequence[int], collisions: str = "reassign_last",
    settings: RQVAESettings = RQVAESettings(), seed: int = 0, kmeans_iters: int = 100,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``sid_build.build_sids`` with an RQ-VAE as the quantiser: codes [N, L'] and the report (``before`` /
    ``after`` the collision handling, and the training facts under ``training``)."""
    check_sid_settings(embeddings, codebook_sizes, collisions)
    if not bool(torch.isfinite(embeddings).all()):
        raise ValueError("embeddings hold non-finite values")
    codes, last_input, last_codebook, facts = train_rq_vae(embeddings, codebook_sizes, settings, seed, kmeans_iters)
    final, report = handle_collisions(codes, last_input, last_codebook, codebook_sizes, collisions)
    return final, {**report, "training": facts}
