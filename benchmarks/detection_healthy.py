"""The healthy runs of the detection corpus: real small models that train well on the CPU.

Every scenario trains a model from scratch, seeded from ``seed`` (``torch.manual_seed``
for the weights, a ``torch.Generator`` for the data order), through a
:class:`gradguard.Guard` with its default detectors, and reports the loss curve and
enough notes (``initial_loss``, ``final_loss``, accuracies, baselines) to show that it
trained. A careful engineer would raise no alarm on any of them: each one is labelled
healthy, with the reason in ``label_reason``. ``final_loss`` is the mean training loss of
the last 10 steps; ``initial_loss`` is the first step's.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import gradguard as gg
from detection_common import LOG_EVERY, RunResult, Scenario, as_float
from gradguard.lab.data import load_digits

LossAt = Callable[[int], Tensor]

# --- shared helpers ----------------------------------------------------------------------


def _train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int,
    loss_at: LossAt,
    *,
    clip: gg.ClipPolicy | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> RunResult:
    """Run ``steps`` guarded steps of ``loss_at(step)`` and return the run.

    The guard has the default detectors and ``log_every=LOG_EVERY``; with a ``scaler`` the
    backward pass goes through ``scaler.scale``. ``first_nonfinite_step`` is the first step
    with a non-finite loss or unscaled gradient, a scaler's overflowed steps included.
    """
    guard = gg.Guard(
        model, optimizer, clip=clip, scheduler=scheduler, scaler=scaler, log_every=LOG_EVERY
    )
    losses: list[float] = []
    first_nonfinite: int | None = None
    skipped = 0
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_at(step)
        (loss if scaler is None else scaler.scale(loss)).backward()
        report = guard.step(loss)
        value = as_float(loss)
        losses.append(value)
        finite = bool(report.finite) and math.isfinite(value)
        if first_nonfinite is None and not finite:
            first_nonfinite = step
        skipped += int(bool(report.skipped))
    guard.close()
    run = RunResult(
        events=list(guard.events),
        losses=losses,
        layer_names=tuple(guard.layer_names),
        first_nonfinite_step=first_nonfinite,
    )
    tail = losses[-10:]
    run.notes.update(
        initial_loss=losses[0], final_loss=sum(tail) / len(tail), skipped_steps=float(skipped)
    )
    return run


def _batches(n: int, batch: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Indices of successive minibatches over shuffled epochs of ``n`` examples."""
    while True:
        perm = torch.randperm(n, generator=generator)
        for at in range(0, n - batch + 1, batch):
            yield perm[at : at + batch]


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Test accuracy of a classifier, in eval mode (the mode is restored)."""
    was_training = model.training
    model.eval()
    accuracy = float((model(x).argmax(dim=-1) == y).float().mean())
    model.train(was_training)
    return accuracy


# --- gpt_adamw: a tiny pre-LN decoder on character-level text ----------------------------

_DOC_MODULES = (
    "json",
    "collections",
    "argparse",
    "textwrap",
    "functools",
    "itertools",
    "pathlib",
    "subprocess",
    "string",
    "random",
    "heapq",
    "bisect",
    "fractions",
    "statistics",
    "csv",
    "shutil",
    "tempfile",
    "logging",
    "difflib",
    "calendar",
)


@functools.cache
def stdlib_text() -> str:
    """Character-level training text built from stdlib docstrings, with no downloads.

    The docstrings of a fixed list of modules and of their public classes and functions
    (in name order), cleaned with ``inspect.cleandoc``: about 100k characters under
    Python 3.11+, the same text on every call.
    """
    parts = []
    for name in _DOC_MODULES:
        module = importlib.import_module(name)
        parts.append(module.__doc__ or "")
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            own = getattr(obj, "__module__", "") == name
            documented = inspect.isclass(obj) or inspect.isfunction(obj)
            if own and documented and not attr.startswith("_"):
                parts.append(obj.__doc__ or "")
    return "\n".join(inspect.cleandoc(p) for p in parts if p)


class _Block(nn.Module):
    """Pre-LN transformer block: LN -> causal self-attention, LN -> GELU MLP, residuals."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``x`` of shape (batch, time, d_model)."""
        b, t, d = x.shape
        qkv = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A GPT-like decoder: token + position embeddings, pre-LN blocks, final LN, LM head.

    Weights are initialized as in GPT-2: normal(0, 0.02), zero biases.
    """

    def __init__(
        self, vocab: int, d_model: int = 64, heads: int = 4, layers: int = 2, context: int = 32
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        """Next-token logits of shape (batch, time, vocab)."""
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _warmup_cosine(steps: int, warmup: int, floor: float = 0.1) -> Callable[[int], float]:
    """LR factor: linear warm-up over ``warmup`` steps, then cosine decay to ``floor``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def run_gpt_adamw(seed: int, quick: bool) -> RunResult:
    """Train the tiny GPT with AdamW, warm-up + cosine and norm clipping on stdlib text."""
    steps, batch, context = (80 if quick else 300), 16, 32
    text = stdlib_text()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train, held_out = data[:split], data[split:]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = TinyGPT(len(chars), context=context)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-3,
        betas=(0.9, 0.95),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(steps, warmup=max(1, steps // 10))
    )

    def windows(source: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
        offsets = starts[:, None] + torch.arange(context + 1)
        chunk = source[offsets]
        return chunk[:, :-1], chunk[:, 1:]

    def loss_at(step: int) -> Tensor:
        starts = torch.randint(len(train) - context - 1, (batch,), generator=gen)
        x, y = windows(train, starts)
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    run = _train(model, optimizer, steps, loss_at, clip=gg.NormClip(1.0), scheduler=scheduler)
    with torch.no_grad():
        starts = torch.arange(0, len(held_out) - context - 1, 97)[:256]
        x, y = windows(held_out, starts)
        run.notes["held_out_loss"] = float(F.cross_entropy(model(x).flatten(0, 1), y.flatten()))
    counts = torch.bincount(train, minlength=len(chars)).double() / len(train)
    counts = counts[counts > 0]
    run.notes["unigram_entropy"] = float(-(counts * counts.log()).sum())
    run.notes["uniform_loss"] = math.log(len(chars))
    return run


# --- bert_cls: a tiny BERT classifier on a counting task ---------------------------------

_BERT_VOCAB, _BERT_LEN = 50, 32
_CLS, _TOKEN_A, _TOKEN_B, _FIRST_FILLER = 1, 2, 3, 4


def count_task(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Sequences of ``[CLS]`` then filler tokens with 1-8 A's and 1-8 B's (never tied).

    The label is 1 when A occurs more often than B; chance accuracy is 50%.
    """
    seq = torch.randint(_FIRST_FILLER, _BERT_VOCAB, (n, _BERT_LEN), generator=generator)
    seq[:, 0] = _CLS
    n_a = torch.randint(1, 9, (n,), generator=generator)
    n_b = torch.randint(1, 8, (n,), generator=generator)
    n_b = n_b + (n_b >= n_a).long()  # uniform over 1..8 without n_a
    for i in range(n):
        positions = 1 + torch.randperm(_BERT_LEN - 1, generator=generator)
        a, b = int(n_a[i]), int(n_b[i])
        seq[i, positions[:a]] = _TOKEN_A
        seq[i, positions[a : a + b]] = _TOKEN_B
    return seq, (n_a > n_b).long()


def run_bert_cls(seed: int, quick: bool) -> RunResult:
    """Train ``transformers``' BertForSequenceClassification (2 layers, width 64) from scratch."""
    from transformers import BertConfig, BertForSequenceClassification

    steps, batch, warmup = (80 if quick else 200), 32, 20
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    config = BertConfig(
        vocab_size=_BERT_VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup)
    )

    def loss_at(step: int) -> Tensor:
        x, y = count_task(batch, gen)
        return model(input_ids=x, labels=y).loss

    run = _train(model, optimizer, steps, loss_at, scheduler=scheduler)
    x_test, y_test = count_task(1000, torch.Generator().manual_seed(10_000 + seed))
    with torch.no_grad():
        model.eval()
        predicted = model(input_ids=x_test).logits.argmax(dim=-1)
    run.notes["test_accuracy"] = float((predicted == y_test).float().mean())
    run.notes["chance_accuracy"] = 0.5
    run.notes["chance_loss"] = math.log(2)
    return run


# --- resnet_bn_digits: a small ResNet with BatchNorm on 8x8 digits -----------------------


class _ResBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the identity, then ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the residual block."""
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


def small_resnet(channels: int = 16, blocks: int = 3) -> nn.Sequential:
    """Stem conv-BN-ReLU, ``blocks`` residual blocks, global average pool, linear head."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        *(_ResBlock(channels) for _ in range(blocks)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, 10),
    )


def run_resnet_bn_digits(seed: int, quick: bool) -> RunResult:
    """Train the small ResNet on digits as 1x8x8 images with SGD momentum 0.9."""
    steps, batch = (120 if quick else 300), 64
    digits = load_digits()
    x_train, x_test = digits.x_train.view(-1, 1, 8, 8), digits.x_test.view(-1, 1, 8, 8)
    torch.manual_seed(seed)
    batches = _batches(len(x_train), batch, torch.Generator().manual_seed(seed))
    model = small_resnet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def loss_at(step: int) -> Tensor:
        idx = next(batches)
        return F.cross_entropy(model(x_train[idx]), digits.y_train[idx])

    run = _train(model, optimizer, steps, loss_at)
    run.notes["test_accuracy"] = _accuracy(model, x_test, digits.y_test)
    return run


# --- lstm_adding: an LSTM on the adding problem -------------------------------------------

_ADDING_BASELINE = 1 / 6  # MSE of always predicting 1: the variance of a sum of 2 U(0, 1)


def adding_batch(n: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The adding problem: values in U(0, 1) and two markers, one in each half; sum them."""
    values = torch.rand(n, length, generator=generator)
    half = length // 2
    first = torch.randint(0, half, (n,), generator=generator)
    second = torch.randint(half, length, (n,), generator=generator)
    markers = torch.zeros(n, length)
    rows = torch.arange(n)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    target = values[rows, first] + values[rows, second]
    return torch.stack([values, markers], dim=-1), target


class AddingLSTM(nn.Module):
    """One LSTM layer read out by a linear layer at the last time step."""

    def __init__(self, hidden: int = 48) -> None:
        super().__init__()
        self.lstm = nn.LSTM(2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        """The predicted sum, shape (batch,)."""
        out, _ = self.lstm(x)
        return self.head(out[:, -1]).squeeze(-1)


def run_lstm_adding(seed: int, quick: bool) -> RunResult:
    """Train the LSTM on the adding problem with Adam (length 30; quick: length 10)."""
    steps, batch, length = (400, 64, 10) if quick else (1000, 64, 30)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = AddingLSTM()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)

    def loss_at(step: int) -> Tensor:
        x, y = adding_batch(batch, length, gen)
        return F.mse_loss(model(x), y)

    run = _train(model, optimizer, steps, loss_at)
    x_test, y_test = adding_batch(1000, length, torch.Generator().manual_seed(10_000 + seed))
    with torch.no_grad():
        run.notes["test_mse"] = float(F.mse_loss(model(x_test), y_test))
    run.notes["baseline_mse"] = _ADDING_BASELINE
    return run


# --- mlp_momentum_noisy: a noisy but converging MLP --------------------------------------


def _digits_mlp(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )


def _digits_classifier_run(
    seed: int,
    steps: int,
    batch: int,
    build: Callable[[], nn.Module],
    optimizer_for: Callable[[nn.Module], torch.optim.Optimizer],
    **train: Any,
) -> RunResult:
    """Train ``build()`` (made after seeding) on shuffled digits batches; note accuracy.

    ``train`` goes to :func:`_train`; a callable ``scheduler`` is given the optimizer.
    """
    digits = load_digits()
    torch.manual_seed(seed)
    batches = _batches(len(digits.x_train), batch, torch.Generator().manual_seed(seed))
    model = build()
    optimizer = optimizer_for(model)
    if callable(train.get("scheduler")):
        train["scheduler"] = train["scheduler"](optimizer)

    def loss_at(step: int) -> Tensor:
        idx = next(batches)
        return F.cross_entropy(model(digits.x_train[idx]), digits.y_train[idx])

    run = _train(model, optimizer, steps, loss_at, **train)
    run.notes["test_accuracy"] = _accuracy(model, digits.x_test, digits.y_test)
    return run


def run_mlp_momentum_noisy(seed: int, quick: bool) -> RunResult:
    """Train a 64-128-128-10 MLP with SGD momentum 0.9 at a high LR (0.05), batch 32."""
    run = _digits_classifier_run(
        seed,
        200 if quick else 500,
        32,
        lambda: _digits_mlp(128),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
    )
    later = run.losses[len(run.losses) // 4 :]
    run.notes["max_loss_after_first_quarter"] = max(later)
    return run


# --- fp16_scaler: fp16 autocast on the CPU with a GradScaler -----------------------------


def run_fp16_scaler(seed: int, quick: bool) -> RunResult:
    """Train an MLP on digits under CPU fp16 autocast, with a GradScaler given to the guard."""
    steps, batch = (150 if quick else 400), 64
    digits = load_digits()
    torch.manual_seed(seed)
    batches = _batches(len(digits.x_train), batch, torch.Generator().manual_seed(seed))
    model = _digits_mlp(256)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    # The default init_scale (2**16) never overflows on this model; a growth interval of
    # 20 steps (default 2000) shows, in a short run, the scaler's lifelong sawtooth: it
    # doubles its scale until a step overflows, skips that step and halves the scale.
    scaler = torch.amp.GradScaler("cpu", growth_interval=20)

    def loss_at(step: int) -> Tensor:
        idx = next(batches)
        with torch.autocast("cpu", dtype=torch.float16):
            logits = model(digits.x_train[idx])
        return F.cross_entropy(logits.float(), digits.y_train[idx])

    run = _train(model, optimizer, steps, loss_at, scaler=scaler)
    with torch.autocast("cpu", dtype=torch.float16):
        run.notes["test_accuracy"] = _accuracy(model, digits.x_test, digits.y_test)
    run.notes["final_scale"] = float(scaler.get_scale())
    return run


# --- learning_transition: saddle-to-learning in a deep linear network --------------------

_LINEAR_WIDTH, _LINEAR_DEPTH = 16, 3
_LINEAR_INIT_STD, _LINEAR_LR = 0.03, 0.1  # a plateau of about 180-200 steps, then the drop


def _teacher() -> Tensor:
    """A fixed rank-2 target map with singular values 4 and 3 (the same for every seed)."""
    gen = torch.Generator().manual_seed(1234)
    u, _ = torch.linalg.qr(torch.randn(_LINEAR_WIDTH, 2, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(_LINEAR_WIDTH, 2, generator=gen))
    return u @ torch.diag(torch.tensor([4.0, 3.0])) @ v.T


def run_learning_transition(seed: int, quick: bool) -> RunResult:
    """Train a 3-layer linear network from a small init on a fixed linear map, with SGD."""
    steps, batch = 400, 256  # cheap: the quick variant keeps the whole transition
    teacher = _teacher()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        *(nn.Linear(_LINEAR_WIDTH, _LINEAR_WIDTH, bias=False) for _ in range(_LINEAR_DEPTH))
    )
    with torch.no_grad():
        for layer in model:
            layer.weight.normal_(0.0, _LINEAR_INIT_STD)
    optimizer = torch.optim.SGD(model.parameters(), lr=_LINEAR_LR)

    def loss_at(step: int) -> Tensor:
        x = torch.randn(batch, _LINEAR_WIDTH, generator=gen)
        return F.mse_loss(model(x), x @ teacher.T)

    run = _train(model, optimizer, steps, loss_at)
    plateau = sum(run.losses[:20]) / 20
    below = [i + 1 for i, loss in enumerate(run.losses) if loss < 0.5 * plateau]
    run.notes["plateau_loss"] = plateau
    run.notes["plateau_steps"] = float(below[0] if below else steps)
    return run


# --- beyond the list: other families, held out while the rules were written -------


class _TinyViT(nn.Module):
    """A ViT-like classifier of 8x8 digits: four 4x4 patches, a class token, 2 blocks."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.zeros(1, 5, width))
        self.patch = nn.Linear(16, width)
        layer = nn.TransformerEncoderLayer(
            width, 4, 2 * width, dropout=0.1, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        patches = x.view(-1, 2, 4, 2, 4).permute(0, 1, 3, 2, 4).reshape(-1, 4, 16)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), self.patch(patches)], 1)
        return self.head(self.encoder(tokens + self.pos)[:, 0])


def run_vit_onecycle(seed: int, quick: bool) -> RunResult:
    """Train a tiny ViT with AdamW, OneCycleLR and NormClip(1.0), which clips at most steps."""
    steps = 120 if quick else 300
    return _digits_classifier_run(
        seed,
        steps,
        64,
        _TinyViT,
        lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.05),
        clip=gg.NormClip(1.0),
        scheduler=lambda opt: torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=3e-3, total_steps=steps
        ),
    )


class _RowGRU(nn.Module):
    """A GRU that reads a digit row by row (8 steps of 8 pixels) and classifies it."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.gru = nn.GRU(8, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.gru(x.view(-1, 8, 8))[0][:, -1])


def run_gru_adamw(seed: int, quick: bool) -> RunResult:
    """Train a row-by-row GRU classifier of digits with AdamW at lr 5e-3."""
    return _digits_classifier_run(
        seed,
        120 if quick else 300,
        64,
        _RowGRU,
        lambda m: torch.optim.AdamW(m.parameters(), lr=5e-3),
    )


def run_cnn_adam(seed: int, quick: bool) -> RunResult:
    """Train a two-conv CNN without normalization, global-average pooled, with Adam."""
    return _digits_classifier_run(
        seed,
        120 if quick else 300,
        64,
        _plain_cnn,
        lambda m: torch.optim.Adam(m.parameters(), lr=3e-3),
    )


def _plain_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


SCENARIOS: list[Scenario] = [
    Scenario(
        name="gpt_adamw",
        healthy=True,
        description=(
            "GPT-like pre-LN decoder (2 blocks, d_model 64, 4 heads, context 32) on "
            "character-level stdlib docstrings; AdamW (lr 3e-3, weight decay 0.1), linear "
            "warm-up + cosine decay, NormClip(1.0); batch 16, 300 steps (quick: 80)."
        ),
        label_reason=(
            "The textbook recipe for a small language model: the loss falls from the "
            "uniform log(vocab) below the unigram entropy and keeps falling; clipping "
            "during warm-up is its intended work, not a fault."
        ),
        run=run_gpt_adamw,
    ),
    Scenario(
        name="bert_cls",
        healthy=True,
        description=(
            "transformers BertForSequenceClassification (2 layers, hidden 64, 2 heads) "
            "from scratch on a counting task (does token A occur more often than B?); "
            "AdamW lr 1e-3 after a 20-step linear warm-up, batch 32, 200 steps (quick: 80)."
        ),
        label_reason=(
            "An ordinary encoder fine-tune-style run: test accuracy rises far above the "
            "50% chance level; dropout and random batches make the loss noisy, as usual."
        ),
        run=run_bert_cls,
    ),
    Scenario(
        name="resnet_bn_digits",
        healthy=True,
        description=(
            "ResNet-style CNN (stem + 3 residual blocks conv-BN-ReLU-conv-BN, 16 channels, "
            "global pool) on digits as 1x8x8 images; SGD momentum 0.9, lr 0.05, batch 64, "
            "300 steps (quick: 120)."
        ),
        label_reason=(
            "BatchNorm ResNets train smoothly at this LR: the loss falls fast to near zero "
            "and test accuracy is high; the shrinking gradient at convergence is success."
        ),
        run=run_resnet_bn_digits,
    ),
    Scenario(
        name="lstm_adding",
        healthy=True,
        description=(
            "LSTM (hidden 48) on the adding problem (length 30, two marked values to sum); "
            "Adam lr 5e-3, batch 64, 1000 steps (quick: length 10, 400 steps)."
        ),
        label_reason=(
            "The loss first sits near the 0.167 baseline of predicting the mean, then the "
            "LSTM learns to gate the marked values and the MSE falls well below it: a gated "
            "RNN doing what it was designed for."
        ),
        run=run_lstm_adding,
    ),
    Scenario(
        name="mlp_momentum_noisy",
        healthy=True,
        description=(
            "MLP 64-128-128-10 (ReLU, PyTorch init) on digits; SGD momentum 0.9 at lr 0.05, "
            "batch 32, 500 steps (quick: 200)."
        ),
        label_reason=(
            "A high but stable LR: minibatch losses jump by large factors from step to "
            "step, yet the run converges to high test accuracy; noise is not instability."
        ),
        run=run_mlp_momentum_noisy,
    ),
    Scenario(
        name="fp16_scaler",
        healthy=True,
        description=(
            "MLP 64-256-256-10 on digits under CPU fp16 autocast with "
            "torch.amp.GradScaler('cpu', growth_interval=20) (init scale 65536) given to "
            "the guard; Adam lr 1e-3, batch 64, 400 steps (quick: 150)."
        ),
        label_reason=(
            "Dynamic loss scaling at work: the scaler doubles its scale until the scaled "
            "gradients overflow fp16, skips that step and halves the scale, again and "
            "again (about 10 skipped steps in 400); the model trains normally."
        ),
        run=run_fp16_scaler,
    ),
    Scenario(
        name="learning_transition",
        healthy=True,
        description=(
            "3-layer linear network (width 16, no bias) from a small init (std 0.03) "
            "learning a fixed rank-2 linear map (singular values 4 and 3), SGD lr 0.1, "
            "batch 256, 400 steps (quick: the same)."
        ),
        label_reason=(
            "Saddle dynamics of deep linear networks (Saxe et al., 2014): a long plateau "
            "with tiny gradients, then a fast drop as each mode is learned, with the "
            "gradient growing through the drop. Plateau and sudden progress are normal."
        ),
        run=run_learning_transition,
    ),
    Scenario(
        name="vit_onecycle",
        healthy=True,
        description=(
            "ViT-like classifier of digits (four 4x4 patches, a class token and position "
            "embedding as bare parameters, 2 pre-LN blocks, dropout 0.1); AdamW lr 3e-3 under "
            "OneCycleLR, NormClip(1.0), batch 64, 300 steps (quick: 120). Added after the "
            "rules were written, to check they carry over."
        ),
        label_reason=(
            "Trains to high test accuracy. NormClip(1.0) is below this model's typical "
            "gradient norm, so it clips at most steps: a recipe choice that scales the "
            "step, not an explosion (the loss falls throughout)."
        ),
        run=run_vit_onecycle,
    ),
    Scenario(
        name="gru_adamw",
        healthy=True,
        description=(
            "GRU (hidden 32) reading each digit row by row, linear head; AdamW lr 5e-3, batch "
            "64, 300 steps (quick: 120). Added after the rules were written."
        ),
        label_reason="A gated RNN on an easy task: the loss falls to about 0.02.",
        run=run_gru_adamw,
    ),
    Scenario(
        name="cnn_adam",
        healthy=True,
        description=(
            "Two 3x3 convolutions (16 and 32 channels, ReLU, no normalization), global "
            "average pooling, linear head; Adam lr 3e-3, batch 64, 300 steps (quick: 120). "
            "Added after the rules were written."
        ),
        label_reason=(
            "A plain CNN without BatchNorm learning steadily (slower than the ResNet: the "
            "global pooling keeps little spatial detail)."
        ),
        run=run_cnn_adam,
    ),
]
