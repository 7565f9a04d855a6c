"""RQ-VAE semantic IDs (atspeed_exp/data/rq_vae.py): training lowers the reconstruction loss, a seed gives the same
codes, the straight-through estimator, and collision handling shared with residual k-means."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from atspeed_exp.data.atspeed_format import load_atspeed_dataset
from atspeed_exp.data.prepare import PrepareSettings, prepare_dataset
from atspeed_exp.data.rq_vae import RQVAE, RQVAESettings, rq_vae_sids, train_rq_vae
from atspeed_exp.data.sid_build import build_index, index_differences, sid_inputs, sid_report
from atspeed_exp.data.synthetic_raw import write_synthetic_reviews

TINY = RQVAESettings(hidden_sizes=(32,), latent_dim=8, epochs=60, batch_size=32, lr=3e-3)


def clusters(n_clusters: int = 8, per_cluster: int = 20, dim: int = 16, noise: float = 0.05, seed: int = 0,
             copies: int = 1) -> torch.Tensor:
    """[n_clusters * per_cluster * copies, dim]: points around random centres, each repeated ``copies`` times."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim))
    points = np.repeat(centres, per_cluster, axis=0) + noise * rng.normal(size=(n_clusters * per_cluster, dim))
    return torch.from_numpy(points).repeat_interleave(copies, dim=0)


def test_rq_vae_training_lowers_the_reconstruction_loss():
    _, _, _, facts = train_rq_vae(clusters(), [4, 4, 8], TINY, seed=0, kmeans_iters=20)
    assert facts["recon_loss_final"] < 0.5 * facts["recon_loss_init"]
    history = [h["recon_loss"] for h in facts["history"]]
    assert history[-1] < history[0] and facts["history"][-1]["epoch"] == TINY.epochs
    assert len(facts["codes_used_init"]) == 3 and all(1 <= used <= size for used, size in
                                                      zip(facts["codes_used_final"], [4, 4, 8]))


def test_rq_vae_is_deterministic_for_a_seed_and_leaves_the_global_rng():
    x = clusters()
    state = torch.get_rng_state()
    a, ra = rq_vae_sids(x, [4, 4, 8], "none", TINY, seed=1, kmeans_iters=20)
    assert torch.equal(torch.get_rng_state(), state)
    b, rb = rq_vae_sids(x, [4, 4, 8], "none", TINY, seed=1, kmeans_iters=20)
    c, _ = rq_vae_sids(x, [4, 4, 8], "none", TINY, seed=2, kmeans_iters=20)
    assert torch.equal(a, b) and ra == rb and not torch.equal(a, c)


def test_straight_through_sends_the_reconstruction_gradient_to_the_encoder_only():
    torch.manual_seed(0)
    model = RQVAE(6, [8], 4, [3, 5])
    x = torch.randn(10, 6)
    output, codes, quant_loss = model(x)
    F.mse_loss(output, x).backward(retain_graph=True)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    assert all(p.grad is None for p in model.codebooks)  # codebooks move by their own loss only
    quant_loss.backward()
    assert all(p.grad is not None for p in model.codebooks)
    assert codes.shape == (10, 2) and int(codes[:, 1].max()) < 5


@pytest.mark.parametrize("collisions,levels", [("reassign_last", 2), ("extra_level", 3)])
def test_rq_vae_collisions_are_handled_in_its_latent_space(collisions, levels):
    x = clusters(n_clusters=6, per_cluster=5, copies=3)  # every point three times: full codes must collide
    codes, report = rq_vae_sids(x, [3, 64], collisions, TINY, seed=0, kmeans_iters=20)
    assert report["before"]["collision_rate"] > 0 and report["after"]["collision_rate"] == 0.0
    assert codes.shape == (len(x), levels)
    sizes = [3, 64] + ([64] if collisions == "extra_level" else [])
    assert report["after"] == sid_report(codes, sizes)
    assert [lv["codes_used"] for lv in report["before"]["levels"]] == report["training"]["codes_used_final"]


def test_rq_vae_settings_name_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match=r"sid.rq_vae: unknown keys \['latent'\]"):
        RQVAESettings.from_dict({"latent": 8}, "sid.rq_vae")
    with pytest.raises(ValueError, match="sid.rq_vae: epochs and batch_size must be >= 1"):
        RQVAESettings.from_dict({"epochs": 0}, "sid.rq_vae")
    assert RQVAESettings.from_dict({"hidden_sizes": [8, 4]}).hidden_sizes == (8, 4)


def test_build_index_with_rq_vae(tmp_path):
    reviews = write_synthetic_reviews(tmp_path / "r.json", num_users=120, num_items=60)
    root = tmp_path / "syn"
    prepare_dataset(reviews, root, "syn", PrepareSettings(k_core=3))
    np.save(tmp_path / "emb.npy", np.random.default_rng(0).normal(size=(60, 16)))
    embedding = {"source": "file", "path": str(tmp_path / "emb.npy")}
    settings = {"hidden_sizes": [16], "latent_dim": 8, "epochs": 30, "batch_size": 16}
    report = build_index(root, "syn", embedding, [4, 4, 16], iters=20, method="rq_vae", rq_vae=settings)
    assert report["after"]["collision_rate"] == 0.0 and report["rq_vae"]["epochs"] == 30
    assert report["training"]["recon_loss_final"] < report["training"]["recon_loss_init"]
    written = json.loads((root / "syn.LCRec-1e-3lr.report.json").read_text())
    assert written["before"]["levels"][0]["usage"] == report["before"]["levels"][0]["usage"]
    assert load_atspeed_dataset(root, "syn").num_levels == 3
    index = root / "syn.LCRec-1e-3lr.json"
    same = sid_inputs(root, "rq_vae", embedding, [4, 4, 16], "reassign_last", 20, 0, rq_vae=settings)
    assert index_differences(index, same) == []
    longer = sid_inputs(root, "rq_vae", embedding, [4, 4, 16], "reassign_last", 20, 0,
                        rq_vae={**settings, "epochs": 40})
    assert index_differences(index, longer) == [f"rq_vae {same['settings']['rq_vae']!r} -> "
                                                f"{longer['settings']['rq_vae']!r}"]


def test_prepare_entry_selects_rq_vae_with_sid_option(tmp_path):
    from hydra import compose, initialize_config_dir

    import atspeed_exp.project_paths  # noqa: F401
    from atspeed_exp.prepare import run

    conf = Path(__file__).resolve().parents[1] / "conf"
    reviews = write_synthetic_reviews(tmp_path / "r.json", num_users=120, num_items=60)
    np.save(tmp_path / "emb.npy", np.random.default_rng(0).normal(size=(60, 16)))
    with initialize_config_dir(str(conf), version_base="1.3"):
        cfg = compose("prepare_data", overrides=[
            "sid=rq_vae", f"prepare.reviews={reviews}", f"prepare.output={tmp_path / 'out'}", "prepare.k_core=3",
            "sid.codebook_sizes=[4,4,16]", f"sid.embedding.path={tmp_path / 'emb.npy'}", "sid.iters=20",
            "sid.rq_vae.hidden_sizes=[16]", "sid.rq_vae.latent_dim=8", "sid.rq_vae.epochs=5"])
    assert cfg.sid.method == "rq_vae" and cfg.sid.collisions == "reassign_last"  # the rest from rq_kmeans.yaml
    run(cfg)
    report = json.loads((tmp_path / "out" / "amazon.LCRec-1e-3lr.report.json").read_text())
    assert report["method"] == "rq_vae" and report["rq_vae"]["epochs"] == 5 and report["training"]["history"]
