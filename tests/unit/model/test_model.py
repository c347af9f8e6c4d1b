"""BiLSTM-CTC: offline batching, latency-controlled chunking, batched multi-stream state."""

from __future__ import annotations

import pytest
import torch

from workers.model.bilstm import COMBINE_MODES, BiLSTMCTC, ModelConfig, reverse_within_lengths

ATOL = 1e-5
CHUNKINGS = [(1, 0), (1, 2), (3, 0), (4, 2), (5, 5), (7, 3), (10, 1)]




def tiny(seed: int = 0, **overrides) -> BiLSTMCTC:
    torch.manual_seed(seed)
    config = ModelConfig(**{"input_dim": 12, "hidden_size": 16, "num_layers": 2, "num_tokens": 29, **overrides})
    return BiLSTMCTC(config).eval()


def features(length: int, seed: int, dim: int = 12) -> torch.Tensor:
    return torch.randn(length, dim, generator=torch.Generator().manual_seed(seed))


def pad(items: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([x.shape[0] for x in items])
    return torch.nn.utils.rnn.pad_sequence(items, batch_first=True), lengths


@torch.no_grad()
def alone(model: BiLSTMCTC, x: torch.Tensor, chunk: int | None = None, rc: int = 0) -> torch.Tensor:
    return model(x.unsqueeze(0), torch.tensor([x.shape[0]]), chunk, rc)[0]


# ---- helpers ---------------------------------------------------------------------------


def test_reverse_within_lengths() -> None:
    x = torch.arange(2 * 5).reshape(2, 5, 1).float()
    out = reverse_within_lengths(x, torch.tensor([5, 3]))
    assert out[0, :, 0].tolist() == [4, 3, 2, 1, 0]
    assert out[1, :, 0].tolist() == [7, 6, 5, 8, 9]  # padding stays in place
    torch.testing.assert_close(reverse_within_lengths(out, torch.tensor([5, 3])), x)


# ---- offline -----------------------------------------------------------------------------


@pytest.mark.parametrize("chunking", [(None, 0), (4, 2)])
def test_batch_item_equals_item_alone(chunking: tuple[int | None, int]) -> None:
    model = tiny()
    items = [features(n, seed=n) for n in (17, 5, 30, 1, 12)]
    x, lengths = pad(items)
    with torch.no_grad():
        batched = model(x, lengths, *chunking)
    assert batched.shape == (5, 30, 29)
    for b, item in enumerate(items):
        n = item.shape[0]
        torch.testing.assert_close(batched[b, :n], alone(model, item, *chunking), atol=ATOL, rtol=0)
    # log-probabilities
    torch.testing.assert_close(batched.exp().sum(-1), torch.ones(5, 30), atol=1e-5, rtol=0)


def test_padding_content_does_not_matter() -> None:
    model = tiny()
    items = [features(20, 1), features(8, 2)]
    x, lengths = pad(items)
    x_noisy = x.clone()
    x_noisy[1, 8:] = 1e3 * torch.randn(12, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x, lengths)[1, :8], model(x_noisy, lengths)[1, :8], atol=ATOL, rtol=0)


def test_offline_matches_packed_bidirectional_lstm_for_one_layer() -> None:
    """The two one-direction LSTMs reproduce nn.LSTM(bidirectional=True) on packed sequences."""
    model = tiny(num_layers=1)
    ref = torch.nn.LSTM(12, 16, batch_first=True, bidirectional=True)
    fwd, bwd = model.forward_lstms[0], model.backward_lstms[0]
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(ref, f"{name}_l0").copy_(getattr(fwd, f"{name}_l0"))
            getattr(ref, f"{name}_l0_reverse").copy_(getattr(bwd, f"{name}_l0"))
        items = [features(n, seed=n) for n in (9, 14, 3)]
        x, lengths = pad(items)
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        hidden, _ = torch.nn.utils.rnn.pad_packed_sequence(ref(packed)[0], batch_first=True)
        expected = model.output(hidden).log_softmax(-1)
        got = model(x, lengths)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(got[b, :n], expected[b, :n], atol=ATOL, rtol=0)


# ---- chunked -----------------------------------------------------------------------------


@pytest.mark.parametrize("rc", [0, 3])
def test_chunk_longer_than_utterance_equals_offline(rc: int) -> None:
    model = tiny()
    x = features(13, 3)
    offline = alone(model, x)
    for chunk in (13, 14, 100):
        torch.testing.assert_close(alone(model, x, chunk, rc), offline, atol=ATOL, rtol=0)


def test_chunking_changes_bidirectional_output() -> None:
    """Sanity: the backward direction really is chunked (else the tests below prove nothing)."""
    model = tiny()
    x = features(20, 4)
    assert not torch.allclose(alone(model, x, 4, 1), alone(model, x), atol=1e-3)


@pytest.mark.parametrize(("chunk", "rc"), CHUNKINGS)
def test_first_layer_forward_direction_is_chunking_invariant(chunk: int, rc: int, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny()
    x = features(23, 5)
    with torch.no_grad():
        reference, _ = model.forward_lstms[0](x.unsqueeze(0))

    calls: list[list[torch.Tensor]] = []  # per window: outputs of forward_lstms[0], chunk part first
    original_window = model.forward_window

    def recording_window(*args, **kwargs):
        calls.append([])
        return original_window(*args, **kwargs)

    monkeypatch.setattr(model, "forward_window", recording_window)
    handle = model.forward_lstms[0].register_forward_hook(lambda _m, _i, out: calls[-1].append(out[0]))
    try:
        with torch.no_grad():
            out = model.forward_windows_sequential(x.unsqueeze(0), torch.tensor([23]), chunk, rc)[0]
    finally:
        handle.remove()
    assert out.shape == (23, 29)
    assert len(calls) == -(-23 // chunk)  # one window per chunk
    chunk_parts = torch.cat([window[0] for window in calls], dim=1)
    torch.testing.assert_close(chunk_parts, reference, atol=ATOL, rtol=0)
    # the lookahead part continues from the chunk's state: it equals the offline frames too
    for k, window in enumerate(calls):
        if len(window) > 1:
            start = (k + 1) * chunk
            torch.testing.assert_close(window[1], reference[:, start : start + window[1].shape[1]], atol=ATOL, rtol=0)


@pytest.mark.parametrize(("chunk", "rc"), CHUNKINGS)
def test_unidirectional_output_is_chunking_invariant(chunk: int, rc: int) -> None:
    model = tiny(bidirectional=False)
    assert len(model.backward_lstms) == 0
    x = features(23, 6)
    torch.testing.assert_close(alone(model, x, chunk, rc), alone(model, x), atol=ATOL, rtol=0)


def test_unidirectional_forward_window_ignores_lookahead() -> None:
    model = tiny(bidirectional=False)
    x = features(8, 7).unsqueeze(0)
    state = model.initial_state(1)
    with torch.no_grad():
        with_rc, s1 = model.forward_window(x, torch.tensor([8]), 5, state)
        without, s2 = model.forward_window(x[:, :5], torch.tensor([5]), 5, state)
    assert with_rc.shape == (1, 5, 29)
    torch.testing.assert_close(with_rc, without, atol=ATOL, rtol=0)
    torch.testing.assert_close(s1, s2, atol=ATOL, rtol=0)


def test_lookahead_changes_only_bidirectional_chunk_output() -> None:
    """With lookahead the chunk sees the future through the backward direction.

    The first layer's carried forward state never sees the lookahead; higher layers' states do,
    through the first layer's backward outputs on the chunk frames (as in LC-BLSTM).
    """
    model = tiny()
    x = features(9, 8).unsqueeze(0)
    y = x.clone()
    y[:, 6:] = torch.randn(1, 3, 12)  # change only the lookahead frames
    state = model.initial_state(1)
    with torch.no_grad():
        out_x, state_x = model.forward_window(x, torch.tensor([9]), 6, state)
        out_y, state_y = model.forward_window(y, torch.tensor([9]), 6, state)
    assert not torch.allclose(out_x, out_y, atol=1e-4)
    torch.testing.assert_close(state_x[0][0], state_y[0][0], atol=0, rtol=0)
    torch.testing.assert_close(state_x[1][0], state_y[1][0], atol=0, rtol=0)


# ---- multi-stream streaming ----------------------------------------------------------------


@pytest.mark.parametrize(("chunk", "rc"), [(4, 2), (5, 0), (3, 5)])
def test_batched_streams_equal_each_stream_alone(chunk: int, rc: int) -> None:
    """Streams of different lengths, joining and leaving at different times, batched per step."""
    model = tiny()
    lengths = [23, 7, 16, 1, 30, 11]
    streams = [features(n, seed=100 + i) for i, n in enumerate(lengths)]
    h0, c0 = model.initial_state(1)
    states = {i: (h0.clone(), c0.clone()) for i in range(len(streams))}
    position = dict.fromkeys(range(len(streams)), 0)
    outputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(streams))}
    rng = torch.Generator().manual_seed(0)
    step = 0
    while any(position[i] < lengths[i] for i in position):
        active = [i for i in position if position[i] < lengths[i]]
        # a random subset (at least one) takes part in this step, in a random order
        chosen = [i for i in active if torch.rand(1, generator=rng) < 0.7] or active[:1]
        chosen = [chosen[j] for j in torch.randperm(len(chosen), generator=rng).tolist()]
        windows = [streams[i][position[i] : position[i] + chunk + rc] for i in chosen]
        x, window_lengths = pad(windows)
        h = torch.cat([states[i][0] for i in chosen], dim=1)
        c = torch.cat([states[i][1] for i in chosen], dim=1)
        with torch.no_grad():
            out, (h, c) = model.forward_window(x, window_lengths, chunk, (h, c))
        for b, i in enumerate(chosen):
            n_out = min(chunk, lengths[i] - position[i])
            outputs[i].append(out[b, :n_out])
            states[i] = (h[:, b : b + 1], c[:, b : b + 1])
            position[i] += chunk
        step += 1
    assert step > max(lengths) // chunk  # the random subsets really interleaved the streams
    for i, x in enumerate(streams):
        got = torch.cat(outputs[i])
        assert got.shape == (lengths[i], 29)
        torch.testing.assert_close(got, alone(model, x, chunk, rc), atol=ATOL, rtol=0)


def test_forward_window_state_shapes() -> None:
    model = tiny(num_layers=3)
    h, c = model.initial_state(4)
    assert h.shape == c.shape == (3, 4, 16)
    with torch.no_grad():
        out, (h2, c2) = model.forward_window(torch.randn(4, 7, 12), torch.tensor([7, 7, 3, 5]), 5, (h, c))
    assert out.shape == (4, 5, 29)
    assert h2.shape == c2.shape == (3, 4, 16)
    assert not torch.equal(h2, h)


# ---- combine modes, latency, config ---------------------------------------------------------


def _combine(mode: str, f: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return {"concat": torch.cat([f, b], -1), "sum": f + b, "mean": (f + b) / 2, "product": f * b}[mode]


@pytest.mark.parametrize("mode", COMBINE_MODES)
def test_combine_modes(mode: str) -> None:
    model = tiny(combine=mode)
    expected_dim = 32 if mode == "concat" else 16
    assert model.config.layer_output_dim == expected_dim
    assert model.output.in_features == expected_dim
    assert model.forward_lstms[1].input_size == expected_dim
    x, lengths = pad([features(11, 1), features(6, 2)])
    with torch.no_grad():
        out = model(x, lengths, 4, 2)
    assert out.shape == (2, 11, 29) and torch.isfinite(out).all()
    # one layer computed by hand: combine(forward, backward) -> linear -> log_softmax
    one = tiny(num_layers=1, combine=mode)
    item = features(9, 3).unsqueeze(0)
    with torch.no_grad():
        f, _ = one.forward_lstms[0](item)
        b, _ = one.backward_lstms[0](item.flip(1))
        expected = one.output(_combine(mode, f, b.flip(1))).log_softmax(-1)
        torch.testing.assert_close(one(item, torch.tensor([9])), expected, atol=ATOL, rtol=0)


def test_latency_ms() -> None:
    assert tiny().latency_ms(10, 5, 30.0) == pytest.approx(450.0)
    assert tiny().latency_ms(10, 0, 30.0) == pytest.approx(300.0)
    assert tiny(bidirectional=False).latency_ms(10, 5, 30.0) == pytest.approx(300.0)


def test_dropout_only_in_training_mode() -> None:
    model = tiny(dropout=0.5)
    x, lengths = pad([features(10, 1)])
    with torch.no_grad():
        torch.testing.assert_close(model(x, lengths), model(x, lengths))
        model.train()
        assert not torch.allclose(model(x, lengths), model(x, lengths))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("combine", "max"),
        ("input_dim", 0),
        ("hidden_size", 0),
        ("num_layers", 0),
        ("num_tokens", -1),
        ("dropout", 1.0),
        ("dropout", -0.1),
    ],
)
def test_invalid_model_config(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"model.{key}"):
        ModelConfig(**{key: value})


def test_default_model_config() -> None:
    config = ModelConfig()
    assert (config.input_dim, config.num_tokens, config.layer_output_dim) == (120, 29, 512)


@pytest.mark.parametrize("overrides", [{}, {"num_layers": 3, "combine": "sum"}, {"bidirectional": False}])
def test_batched_windows_equal_one_window_at_a_time(overrides: dict) -> None:
    """``forward`` runs all chunks of a batch at once; a stream runs ``forward_window`` per chunk.

    Both must give the same log-probabilities on every valid frame, for any chunking,
    utterance lengths (shorter than, equal to, not a multiple of the chunk) and padding.
    """
    model = tiny(**overrides)
    for frames in (2, 17, 23, 40):
        lengths = torch.tensor([frames, max(1, frames // 2), 1, frames - 1 or 1])
        x = features(4 * frames, seed=frames).reshape(4, frames, 12)
        for chunk, rc in [*CHUNKINGS, (6, 20)]:
            with torch.no_grad():
                batched = model(x, lengths, chunk, rc)
                sequential = model.forward_windows_sequential(x, lengths, chunk, rc)
            for b, n in enumerate(lengths.tolist()):
                torch.testing.assert_close(batched[b, :n], sequential[b, :n], atol=ATOL, rtol=0)


def test_batched_windows_give_the_same_gradients() -> None:
    """Training uses the batched path: its gradients are those of the per-window computation."""
    grads = []
    x = features(2 * 19, seed=7).reshape(2, 19, 12)
    lengths = torch.tensor([19, 11])
    for path in ("forward", "forward_windows_sequential"):
        model = tiny()
        out = getattr(model, path)(x, lengths, 5, 3)
        mask = (torch.arange(19).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(-1)
        (out * mask).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
