"""GaLore, Natural GaLore and LoRA+ (peftlab.optim): dense references, state memory, training."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftlab
from peftlab.core.errors import ConfigError
from peftlab.methods.adalink import AdaLinkConfig
from peftlab.training.optim import (OPTIMIZERS, SubspaceAdamW, build_optimizer, optimizer_state_bytes,
                           projected_side)

from conftest import VOCAB, tiny_llama

torch.set_num_threads(1)


def gradients(shape: tuple[int, ...], steps: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(steps)]


def run(optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
        grads: list[list[torch.Tensor]]) -> None:
    """One optimizer step per entry of `grads` (one gradient per parameter)."""
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        optimizer.step()


# ---- plain AdamW groups ---------------------------------------------------------------------------
def test_plain_groups_match_torch_adamw_step_by_step():
    torch.manual_seed(0)
    shapes = [(6, 5), (7,), (3, 4, 2)]
    ours = [nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    opt = SubspaceAdamW([{"params": ours[:2], "weight_decay": 0.1}, {"params": ours[2:], "lr": 3e-2}],
                        lr=1e-2, betas=(0.8, 0.99), weight_decay=0.02)
    ref_opt = torch.optim.AdamW([{"params": ref[:2], "weight_decay": 0.1}, {"params": ref[2:], "lr": 3e-2}],
                                lr=1e-2, betas=(0.8, 0.99), weight_decay=0.02)
    assert [g["eps"] for g in opt.param_groups] == [1e-8, 1e-8]     # AdamW's default, not GaLore's
    for grads in zip(*(gradients(s, 6, seed=i) for i, s in enumerate(shapes)), strict=True):
        run(opt, ours, [list(grads)])
        run(ref_opt, ref, [list(grads)])
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert all((p - p0).abs().max() > 1e-2 for p, p0 in zip(ours, start, strict=True))


def test_ineligible_params_in_a_subspace_group_take_adamw_steps():
    # A vector and a matrix whose smaller side equals the rank: nothing to project.
    torch.manual_seed(1)
    ours = [nn.Parameter(torch.randn(9)), nn.Parameter(torch.randn(4, 30))]
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    opt = SubspaceAdamW([{"params": ours, "rank": 4, "eps": 1e-8}], lr=1e-2, weight_decay=0.05)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.05)
    grads = list(zip(gradients((9,), 4, 1), gradients((4, 30), 4, 2), strict=True))
    run(opt, ours, [list(g) for g in grads])
    run(ref_opt, ref, [list(g) for g in grads])
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert projected_side((4, 30), 4) is None and projected_side((5, 30), 4) == "left"


# ---- dense references -----------------------------------------------------------------------------
def dense_reference(W0: torch.Tensor, grads: list[torch.Tensor], *, rank: int, gap: int, side: str,
                    lr: float, scale: float, wd: float, eps: float, betas=(0.9, 0.999),
                    history: int | None = None, damping: float = 1e-3, reset: bool = True,
                    relative: bool = False) -> torch.Tensor:
    """GaLore (history None) or Natural GaLore written out densely in float64: SVD projector every
    `gap` steps (side "both": Pᵀ G Q), explicit Fisher (λI + Σ g gᵀ; `relative`: λ times the
    mean ‖g‖² of the history) solved with torch.linalg.solve, Adam by hand. Returns the final weight."""
    W = W0.double().clone()
    m = v = None
    past: list[torch.Tensor] = []
    for t, G in enumerate(grads, start=1):
        if (t - 1) % gap == 0:
            U, _, Vh = torch.linalg.svd(G.float(), full_matrices=False)   # float32 SVD, as the optimizer
            P = (U[:, :rank] if side in ("left", "both") else Vh[:rank].T).double()
            Q = Vh[:rank].T.double()
            if t > 1 and reset:
                past = []
        R = {"left": lambda: P.T @ G.double(), "right": lambda: G.double() @ P,
             "both": lambda: P.T @ G.double() @ Q}[side]()                    # (r, n), (m, r), (r, r)
        if history is not None:
            past = (past + [R.flatten()])[-history:]
            Gm = torch.stack(past, dim=1)                                     # (k, c)
            lam = damping * (Gm.square().sum(0).mean() if relative else 1.0)
            fisher = lam * torch.eye(Gm.shape[0], dtype=torch.float64) + Gm @ Gm.T
            R = torch.linalg.solve(fisher, R.flatten()).view_as(R)
        m = (1 - betas[0]) * R if m is None else betas[0] * m + (1 - betas[0]) * R
        v = (1 - betas[1]) * R * R if v is None else betas[1] * v + (1 - betas[1]) * R * R
        N = (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
        W = W - lr * scale * {"left": lambda: P @ N, "right": lambda: N @ P.T, "both": lambda: P @ N @ Q.T}[side]()
        W = W * (1 - lr * wd)
    return W


def subspace_run(shape, steps, *, seed=0, device="cpu", dtype=torch.float32, lr=1e-2, **options
                 ) -> tuple[torch.Tensor, torch.Tensor, list, dict]:
    """Run SubspaceAdamW on one weight with random gradients; return start, end (on the CPU),
    the gradients and {"opt", "projectors", "group"}."""
    torch.manual_seed(seed)
    W = nn.Parameter(torch.randn(shape).to(device, dtype))
    W0 = W.detach().cpu().clone()
    grads = gradients(shape, steps, seed + 10)
    group = {"params": [W], "lr": lr, "weight_decay": 0.1, "scale": 0.25, **options}
    opt = SubspaceAdamW([group])
    projectors = []
    for G in grads:
        W.grad = G.to(device, dtype)
        opt.step()
        projectors.append(opt.state[W]["projector"].cpu().clone())
    return W0, W.detach().cpu(), grads, {"opt": opt, "projectors": projectors, "group": opt.param_groups[0]}


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device"))]


@pytest.mark.parametrize("shape, side", [((12, 20), "left"), ((20, 12), "right")])
def test_galore_matches_dense_computation_on_both_sides(shape, side):
    W0, W, grads, info = subspace_run(shape, 7, rank=4, update_gap=3)
    assert projected_side(shape, 4) == side
    g = info["group"]
    assert g["eps"] == 1e-6 and g["preconditioner"] == "none"
    expected = dense_reference(W0, grads, rank=4, gap=3, side=side, lr=1e-2, scale=0.25, wd=0.1,
                                  eps=1e-6)
    torch.testing.assert_close(W.double(), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(W, W0, atol=1e-3)
    # State lives on the smaller side.
    state = info["opt"].state[info["opt"].param_groups[0]["params"][0]]
    assert state["exp_avg"].shape == ((4, 20) if side == "left" else (20, 4))
    assert state["projector"].shape == (12, 4)


def test_projector_refreshes_exactly_every_update_gap_steps():
    _, _, grads, info = subspace_run((12, 20), 8, rank=4, update_gap=3)
    projectors = info["projectors"]
    changed = [step for step in range(1, 8) if not torch.equal(projectors[step], projectors[step - 1])]
    assert changed == [3, 6]          # 0-based steps 0, 3, 6 compute a projector; others reuse it
    for step in (0, 3, 6):            # and each is the SVD of that step's own gradient
        U = torch.linalg.svd(grads[step], full_matrices=False).U[:, :4]
        torch.testing.assert_close(projectors[step], U)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("history, steps", [(10, 5), (3, 7)])   # longer than the run; wrapping around
@pytest.mark.parametrize("shape, side", [((12, 20), "left"), ((20, 12), "right")])
def test_natural_galore_matches_explicit_fisher(history, steps, shape, side, device):
    """The paper's form: one-sided projection, absolute damping."""
    options = {"rank": 4, "update_gap": 4, "preconditioner": "natural", "history": history, "damping": 1e-3,
               "projection": "one-sided", "damping_mode": "absolute"}
    W0, W, grads, info = subspace_run(shape, steps, device=device, **options)
    expected = dense_reference(W0, grads, rank=4, gap=4, side=side, lr=1e-2, scale=0.25, wd=0.1,
                                  eps=1e-6, history=history, damping=1e-3)
    torch.testing.assert_close(W.double(), expected, rtol=0, atol=1e-5)
    # The preconditioner matters: plain GaLore on the same gradients ends elsewhere.
    galore = dense_reference(W0, grads, rank=4, gap=4, side=side, lr=1e-2, scale=0.25, wd=0.1, eps=1e-6)
    assert (galore - expected).abs().max() > 1e-3
    state = info["opt"].state[info["opt"].param_groups[0]["params"][0]]
    assert state["history"].shape == (history, 80)
    assert {t.device.type for t in state.values() if isinstance(t, torch.Tensor)} == {device}


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
@pytest.mark.parametrize("relative", [True, False])
def test_two_sided_natural_galore_matches_explicit_fisher(shape, relative):
    """The official code's form (Natural GaLore's default): an r×r core Pᵀ G Q, history s × r²;
    damping relative to the history's mean squared norm by default."""
    options = {"rank": 4, "update_gap": 3, "preconditioner": "natural", "history": 3, "damping": 0.05,
               **({} if relative else {"damping_mode": "absolute"})}
    W0, W, grads, info = subspace_run(shape, 7, **options)
    group = info["group"]
    assert group["projection"] == "two-sided" and group["damping_mode"] == ("relative" if relative else "absolute")
    expected = dense_reference(W0, grads, rank=4, gap=3, side="both", lr=1e-2, scale=0.25, wd=0.1,
                               eps=1e-6, history=3, damping=0.05, relative=relative)
    torch.testing.assert_close(W.double(), expected, rtol=0, atol=1e-5)
    other = dense_reference(W0, grads, rank=4, gap=3, side="both", lr=1e-2, scale=0.25, wd=0.1,
                            eps=1e-6, history=3, damping=0.05, relative=not relative)
    assert (other - expected).abs().max() > 1e-4          # the damping mode matters here
    state = info["opt"].state[info["opt"].param_groups[0]["params"][0]]
    assert state["history"].shape == (3, 16) and state["exp_avg"].shape == (4, 4)
    assert state["projector"].shape == (shape[0], 4) and state["projector_right"].shape == (shape[1], 4)


def test_half_precision_params_keep_their_dtype_and_follow_the_float32_run():
    options = {"rank": 4, "update_gap": 2, "preconditioner": "natural", "history": 3, "lr": 0.1}
    W0, W32, _, _ = subspace_run((12, 20), 4, **options)
    _, W16, _, info = subspace_run((12, 20), 4, dtype=torch.bfloat16, **options)
    state = info["opt"].state[info["opt"].param_groups[0]["params"][0]]
    assert {t.dtype for t in state.values() if isinstance(t, torch.Tensor)} == {torch.bfloat16}
    update32 = W32 - W0
    update16 = W16.float() - W0.bfloat16().float()
    # bf16 rounds weights near 1 to ~4e-3 at every step: measured mean |difference| 0.0055 against
    # a mean |update| of 0.034 (max 0.045 against 0.12).
    assert (update16 - update32).abs().mean() <= 0.25 * update32.abs().mean()
    assert (update16 - update32).abs().max() <= 0.5 * update32.abs().max()
    assert update32.abs().mean() > 0.02


def test_state_dict_round_trip_resumes_exactly():
    torch.manual_seed(2)
    grads = gradients((12, 20), 6, seed=4)

    def make(W):
        return SubspaceAdamW([{"params": [W], "rank": 4, "update_gap": 3, "preconditioner": "natural",
                               "history": 2}], lr=1e-2)

    W = nn.Parameter(torch.randn(12, 20))
    W_resumed = nn.Parameter(W.detach().clone())
    straight = make(W)
    run(straight, [W], [[g] for g in grads])
    first = make(W_resumed)
    run(first, [W_resumed], [[g] for g in grads[:4]])
    second = make(W_resumed)
    second.load_state_dict(first.state_dict())
    run(second, [W_resumed], [[g] for g in grads[4:]])
    assert torch.equal(W, W_resumed)


def test_natural_galore_history_survives_a_switch_when_reset_is_off():
    options = {"rank": 4, "update_gap": 2, "preconditioner": "natural", "history": 4, "damping": 1e-3,
               "projection": "one-sided", "damping_mode": "absolute"}
    W0, W, grads, _ = subspace_run((12, 20), 6, reset_history_on_switch=False, **options)
    kept = dense_reference(W0, grads, rank=4, gap=2, side="left", lr=1e-2, scale=0.25, wd=0.1,
                              eps=1e-6, history=4, reset=False)
    reset = dense_reference(W0, grads, rank=4, gap=2, side="left", lr=1e-2, scale=0.25, wd=0.1,
                               eps=1e-6, history=4, reset=True)
    torch.testing.assert_close(W.double(), kept, rtol=0, atol=1e-5)
    assert (kept - reset).abs().max() > 1e-4


# ---- state memory ---------------------------------------------------------------------------------
def square_model(d: int = 64, layers: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(d, d) for _ in range(layers)])


def one_step_state_bytes(model: nn.Module, name: str, **options) -> int:
    opt = build_optimizer(list(model.named_parameters()), name, lr=1e-3, **options)
    model(torch.randn(4, model[0].in_features)).square().mean().backward()
    opt.step()
    return optimizer_state_bytes(opt)


def test_state_memory_matches_the_shapes():
    d, r, s, layers, f32 = 64, 8, 20, 3, 4
    base = square_model(d, layers)
    adamw = one_step_state_bytes(copy.deepcopy(base), "adamw")
    galore = one_step_state_bytes(copy.deepcopy(base), "galore", rank=r)
    natural = one_step_state_bytes(copy.deepcopy(base), "natural-galore", rank=r, history=s,
                                   projection="one-sided")
    two_sided = one_step_state_bytes(copy.deepcopy(base), "natural-galore", rank=r, history=s)
    weights, biases = layers * d * d, layers * d
    # torch's AdamW: two moments per element and a float32 step counter per parameter.
    assert adamw == f32 * (2 * (weights + biases) + 2 * layers)
    plain_share = f32 * 2 * biases                               # biases take AdamW steps in both
    per_matrix = 2 * r * d + d * r                               # two r×n moments + the m×r projector
    assert galore == f32 * layers * per_matrix + plain_share
    assert natural == galore + f32 * layers * s * r * d          # + the s × r·n gradient history
    # two-sided: P (m, r), Q (n, r), two r×r moments, an s × r² history
    assert two_sided == f32 * layers * (2 * d * r + 2 * r * r + s * r * r) + plain_share
    # on MiniLM-wide matrices (384) at rank 8 that is less than GaLore's state (1.2× would be the
    # bound); at r/d = 1/8 here, s·r² outweighs what Q saves
    wide = square_model(384, 2)
    galore_wide = one_step_state_bytes(copy.deepcopy(wide), "galore", rank=r)
    assert one_step_state_bytes(copy.deepcopy(wide), "natural-galore", rank=r, history=s) <= 1.2 * galore_wide
    assert galore < two_sided < natural
    expected_fraction = (f32 * layers * per_matrix + plain_share) / (f32 * 2 * (weights + biases))
    assert galore / adamw <= expected_fraction < 0.21            # 3rd / 2d² = 0.1875 for the matrices


# ---- training -------------------------------------------------------------------------------------
def lm_losses(name: str, steps: int = 100, **options) -> list[float]:
    """Full-weight training of tiny_llama's 2-D weights on one fixed batch (memorisation)."""
    model = tiny_llama(0).train()
    for pname, p in model.named_parameters():
        p.requires_grad_(p.dim() == 2)
    ids = torch.randint(1, VOCAB, (4, 16), generator=torch.Generator().manual_seed(3))
    opt = build_optimizer(list(model.named_parameters()), name, lr=3e-3, **options)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def test_galore_and_natural_galore_train_about_as_well_as_adamw():
    adamw = lm_losses("adamw")
    # Rank 8 of hidden 32, the paper's fine-tuning scale 4, a projector refresh every 50 steps.
    options = {"rank": 8, "update_gap": 50, "scale": 4.0}
    galore = lm_losses("galore", **options)
    one_sided = {"projection": "one-sided", **options}
    natural = lm_losses("natural-galore", **one_sided)                     # relative λ = 1
    natural_paper_damping = lm_losses("natural-galore", damping_mode="absolute", **one_sided)
    two_sided = lm_losses("natural-galore", **options)                     # the defaults
    print(f"initial {adamw[0]:.3f}; final adamw {adamw[-1]:.3f}, galore {galore[-1]:.3f}, natural "
          f"one-sided {natural[-1]:.3f} (relative λ=1), {natural_paper_damping[-1]:.3f} (absolute "
          f"λ=1e-3), two-sided {two_sided[-1]:.3f}")
    # Measured (100 steps): initial 4.57; final adamw 0.113, galore 0.056, natural one-sided 0.058.
    # Tolerance: final <= 1.5 × AdamW's final and <= 0.5 × the initial loss.
    for losses in (galore, natural):
        assert losses[0] == pytest.approx(adamw[0])
        assert losses[-1] <= 0.5 * losses[0]
        assert losses[-1] <= 1.5 * adamw[-1]
    # With the paper's absolute λ = 1e-3, small against this tiny model's projected gradients
    # (|g|² up to ~0.4), g̃ ≈ (GGᵀ)⁺ g whitens the history: it amplifies the directions in which
    # successive gradients differ over their common descent direction, and the loss falls much
    # more slowly (measured 1.76; relative λ 1e-3: 1.93, 0.1: 0.51, 1: 0.058, 10: 0.006).
    assert natural_paper_damping[-1] <= 0.5 * natural_paper_damping[0]
    # Two-sided (the code's r×r core, the default for its memory) learns in an 8×8 core of these
    # 32-wide matrices, far less than one-sided's 8×32: measured 2.05 (GaLore two-sided 1.17).
    assert two_sided[-1] <= 0.5 * two_sided[0]


# ---- building by name, LoRA+ ----------------------------------------------------------------------
def lora_model() -> peftlab.AdaptedModel:
    am = peftlab.adapt(tiny_llama(0))
    am.add_adapter("a", peftlab.LoraConfig(r=4, alpha=8, targets=["attn.q", "attn.v"]))
    am.set_active(["a"])
    am.set_trainable("a")
    return am


def groups_by_name(opt: torch.optim.Optimizer) -> dict[str, float]:
    return {n: g["lr"] for g in opt.param_groups for n in g["param_names"]}


def test_loraplus_puts_b_at_ratio_times_lr_and_a_at_lr():
    am = lora_model()
    opt = build_optimizer(list(am.named_parameters()), "loraplus", lr=1e-4, loraplus_ratio=16.0)
    lrs = groups_by_name(opt)
    assert isinstance(opt, torch.optim.AdamW)
    assert len(lrs) == 2 * 2 * 2                      # 2 layers × (q, v) × (A, B); base frozen
    for name, lr in lrs.items():
        assert lr == pytest.approx(1.6e-3 if name.endswith(".lora_B") else 1e-4), name
    assert {g["param_kind"] for g in opt.param_groups} == {"lora_B", "default"}


def test_loraplus_finds_adalink_up_factor():
    am = peftlab.adapt(tiny_llama(0))
    am.add_adapter("link", AdaLinkConfig(r=4))
    am.set_trainable("link")
    opt = build_optimizer(list(am.named_parameters()), "loraplus", lr=1e-4, loraplus_ratio=8.0)
    lrs = {name.rsplit(".", 1)[-1]: lr for name, lr in groups_by_name(opt).items()}
    assert lrs == {"D": pytest.approx(1e-4), "U": pytest.approx(8e-4)}


def test_loraplus_without_a_lora_adapter_is_an_error():
    model = tiny_llama(0)
    with pytest.raises(ConfigError, match="LoRA\\+ needs a LoRA adapter"):
        build_optimizer(list(model.named_parameters()), "loraplus")


def test_lr_scale_glob_splits_groups_first_match_wins():
    am = lora_model()
    named = list(am.named_parameters())
    opt = build_optimizer(named, "loraplus", lr=1e-4, loraplus_ratio=4.0,
                          lr_scale={"*layers.0.*lora_A": 0.5, "*layers.0.*": 2.0})
    lrs = groups_by_name(opt)
    for name, lr in lrs.items():
        factor = 0.5 if "layers.0." in name and name.endswith("lora_A") else 2.0 if "layers.0." in name else 1.0
        ratio = 4.0 if name.endswith("lora_B") else 1.0
        assert lr == pytest.approx(1e-4 * factor * ratio), name
    adamw = build_optimizer(named, "adamw", lr=1e-4, lr_scale={"*lora_B": 3.0})
    assert sorted(g["lr"] for g in adamw.param_groups) == pytest.approx([1e-4, 3e-4])
    with pytest.raises(ConfigError, match="matches no trainable parameter"):
        build_optimizer(named, "adamw", lr_scale={"*lora_C": 2.0})


def test_galore_groups_split_projected_and_plain_params():
    model = square_model(64, 2)
    opt = build_optimizer(list(model.named_parameters()), "natural-galore", lr=1e-3, rank=8, history=5,
                          lr_scale={"1.*": 0.1})
    kinds = {(g["param_kind"], g["lr"]): g["param_names"] for g in opt.param_groups}
    assert kinds == {("subspace", 1e-3): ["0.weight"], ("plain", 1e-3): ["0.bias"],
                     ("subspace", 1e-4): ["1.weight"], ("plain", 1e-4): ["1.bias"]}
    sub = next(g for g in opt.param_groups if g["param_kind"] == "subspace")
    assert (sub["rank"], sub["preconditioner"], sub["history"], sub["eps"]) == (8, "natural", 5, 1e-6)


def test_bad_names_and_options_are_config_errors():
    named = list(square_model(64, 1).named_parameters())
    with pytest.raises(ConfigError, match="unknown optimizer 'galor'.*did you mean 'galore'") as err:
        build_optimizer(named, "galor")
    assert all(o in str(err.value) for o in OPTIMIZERS)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer([], "adamw")
    for bad in ({"rank": 0}, {"update_gap": -1}, {"history": 0}, {"damping": 0.0}, {"proj_side": "top"},
                {"scale": -1.0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            build_optimizer(named, "natural-galore", **bad)
    with pytest.raises(ConfigError, match="rank"):
        SubspaceAdamW([{"params": [named[0][1]], "rank": 2.5}])
