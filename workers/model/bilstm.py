"""BiLSTM-CTC acoustic model with latency-controlled (chunked) streaming.

Shapes: features ``x`` are (batch, frames, feature_dim); ``lengths`` (batch,) counts valid
frames; the output is CTC log-probabilities (batch, frames, num_tokens). The model does
not subsample: one output per input (stacked) frame.

Latency-controlled BLSTM (LC-BLSTM): the utterance is cut into chunks of
``chunk_frames``; each chunk is processed with ``right_context_frames`` of lookahead.
At every layer the forward direction continues from the state it had at the end of the
previous chunk's own frames (it also runs over the lookahead frames, but that state is
discarded), and the backward direction starts from zeros at the end of chunk + lookahead. Only the chunk's
frames are emitted. Training runs the same windows, so what is learned is what streams.
Offline decoding is the special case of one chunk covering the utterance.

Each direction is a one-direction ``nn.LSTM`` (cuDNN on a GPU); the backward one runs on
sequences reversed within their own length, which gives the outputs of a packed
bidirectional LSTM on padded batches at about twice the CPU speed.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.model.config import COMBINE_MODES, QUANTIZE_MODES, ModelConfig  # noqa: F401  (re-exported)

LstmState = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (num_layers, batch, hidden)


def reverse_within_lengths(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each sequence of (batch, frames, dim) within its first ``lengths[b]`` frames.

    Frames past a sequence's length stay where they are (still padding).
    """
    batch, frames = x.shape[:2]
    t = torch.arange(frames, device=x.device).unsqueeze(0)  # (1, frames)
    lens = lengths.to(x.device).unsqueeze(1)
    idx = torch.where(t < lens, lens - 1 - t, t)  # (batch, frames)
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[2]))


class BiLSTMCTC(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        dims = [config.input_dim] + [config.layer_output_dim] * (config.num_layers - 1)
        self.forward_lstms = nn.ModuleList(nn.LSTM(d, config.hidden_size, batch_first=True) for d in dims)
        self.backward_lstms = nn.ModuleList(
            nn.LSTM(d, config.hidden_size, batch_first=True) for d in dims if config.bidirectional
        )
        self.dropout = nn.Dropout(config.dropout)
        self.output = nn.Linear(config.layer_output_dim, config.num_tokens)
        # True after ``quantize_model(..., "int8")``: windows then run one stream at a time
        # over their valid frames only (see ``forward_window``).
        self.row_wise = False
        # bfloat16 after ``quantize_model(..., "bf16")``: windows and utterances run under
        # autocast with bfloat16 weights (float32 in and out).
        self.autocast_dtype: torch.dtype | None = None

    # ---- state ---------------------------------------------------------------------
    def initial_state(self, batch: int, device: torch.device | str = "cpu") -> LstmState:
        """Zero forward-direction state: h and c each (num_layers, batch, hidden)."""
        shape = (self.config.num_layers, batch, self.config.hidden_size)
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)

    def _combine(self, fwd: torch.Tensor, bwd: torch.Tensor) -> torch.Tensor:
        mode = self.config.combine
        if mode == "concat":
            return torch.cat([fwd, bwd], dim=-1)
        if mode == "sum":
            return fwd + bwd
        if mode == "mean":
            return 0.5 * (fwd + bwd)
        return fwd * bwd

    def _add_backward(self, layer: int, layer_in: torch.Tensor, window_lengths: torch.Tensor, fwd: torch.Tensor) -> torch.Tensor:
        """Next layer's input: ``fwd`` (windows, frames, hidden) combined with the backward
        direction run from zeros at each window's last valid frame, then dropout."""
        if self.config.bidirectional:
            bwd, _ = self.backward_lstms[layer](reverse_within_lengths(layer_in, window_lengths))
            fwd = self._combine(fwd, reverse_within_lengths(bwd, window_lengths))
        return self.dropout(fwd)

    # ---- one window ----------------------------------------------------------------
    def forward_window(
        self,
        x: torch.Tensor,
        window_lengths: torch.Tensor,
        chunk_frames: int,
        state: LstmState,
    ) -> tuple[torch.Tensor, LstmState]:
        """Process one chunk plus its lookahead for a batch of streams.

        x: (batch, window_frames, feature_dim), window_frames <= chunk_frames + lookahead;
        window_lengths: (batch,) valid frames per stream in this window;
        chunk_frames: frames [0, chunk_frames) are the chunk, the rest is lookahead;
        state: forward-direction (h, c) at the end of the previous chunk.
        Returns log-probs (batch, min(chunk_frames, window_frames), num_tokens) and the
        forward state after the chunk (valid for streams whose chunk was complete).

        A dynamically quantised model scales each LSTM/Linear input tensor by its own
        range, so one stream's numbers would depend on the streams and padding batched with
        it; ``row_wise`` models therefore run each stream alone over its valid frames, which
        keeps streaming output equal to offline chunked output.
        """
        if self.autocast_dtype is not None:
            with torch.autocast(x.device.type, dtype=self.autocast_dtype):
                out, (h, c) = self._forward_window_batch(x, chunk_frames, window_lengths, state)
            return out.float(), (h.float(), c.float())
        if self.row_wise:
            return self._forward_window_rows(x, window_lengths, chunk_frames, state)
        return self._forward_window_batch(x, chunk_frames, window_lengths, state)

    def _forward_window_batch(
        self, x: torch.Tensor, chunk_frames: int, window_lengths: torch.Tensor, state: LstmState
    ) -> tuple[torch.Tensor, LstmState]:
        """``forward_window`` for all streams of the batch in one call."""
        h0, c0 = state
        n_chunk = min(chunk_frames, x.shape[1])
        new_h, new_c = [], []
        layer_in = x
        for layer in range(self.config.num_layers):
            fwd_lstm = self.forward_lstms[layer]
            init = (h0[layer : layer + 1].contiguous(), c0[layer : layer + 1].contiguous())
            fwd_chunk, (h, c) = fwd_lstm(layer_in[:, :n_chunk], init)
            new_h.append(h)
            new_c.append(c)
            if layer_in.shape[1] > n_chunk:  # lookahead: continue from the chunk state, then discard it
                fwd_rc, _ = fwd_lstm(layer_in[:, n_chunk:], (h, c))
                fwd = torch.cat([fwd_chunk, fwd_rc], dim=1)
            else:
                fwd = fwd_chunk
            layer_in = self._add_backward(layer, layer_in, window_lengths, fwd)
        logits = self.output(layer_in[:, :n_chunk])
        return logits.log_softmax(dim=-1), (torch.cat(new_h), torch.cat(new_c))

    def _forward_window_rows(
        self, x: torch.Tensor, window_lengths: torch.Tensor, chunk_frames: int, state: LstmState
    ) -> tuple[torch.Tensor, LstmState]:
        """``forward_window`` one stream at a time, each over its first ``window_lengths[b]``
        frames; padding frames get zero log-probs and a stream with none keeps its state."""
        n_chunk = min(chunk_frames, x.shape[1])
        out = x.new_zeros(x.shape[0], n_chunk, self.config.num_tokens)
        hs, cs = list(state[0].unbind(1)), list(state[1].unbind(1))
        for b, n in enumerate(window_lengths.tolist()):
            if n <= 0:
                continue
            init = (state[0][:, b : b + 1], state[1][:, b : b + 1])
            log_probs, (h, c) = self._forward_window_batch(x[b : b + 1, :n], chunk_frames, window_lengths[b : b + 1], init)
            out[b, : log_probs.shape[1]] = log_probs[0]
            hs[b], cs[b] = h[:, 0], c[:, 0]
        return out, (torch.stack(hs, dim=1), torch.stack(cs, dim=1))

    # ---- whole utterances ----------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor,
        chunk_frames: int | None = None,
        right_context_frames: int = 0,
    ) -> torch.Tensor:
        """(batch, frames, feature_dim) -> log-probs (batch, frames, num_tokens).

        ``chunk_frames=None`` is full-utterance (offline) mode; otherwise the utterance
        is processed as latency-controlled chunks, exactly as a stream would be.
        """
        if x.dim() != 3 or x.shape[2] != self.config.input_dim:
            raise ValueError(f"expected features of shape (batch, frames, {self.config.input_dim}), got {tuple(x.shape)}")
        if chunk_frames is not None and chunk_frames < 1 or right_context_frames < 0:
            raise ValueError(f"need chunk_frames >= 1 and right_context_frames >= 0, got {chunk_frames}, {right_context_frames}")
        batch, frames = x.shape[:2]
        if frames == 0:
            return x.new_zeros(batch, 0, self.config.num_tokens)
        if chunk_frames is None or chunk_frames >= frames:
            chunk_frames, right_context_frames = max(frames, 1), 0
        if not self.config.bidirectional:
            right_context_frames = 0
        if chunk_frames >= frames:
            return self.forward_window(x, lengths.to(x.device).clamp(max=frames), frames, self.initial_state(batch, x.device))[0]
        if self.row_wise:  # batched windows would share quantisation ranges: one window at a time
            return self.forward_windows_sequential(x, lengths, chunk_frames, right_context_frames)
        if self.autocast_dtype is not None:
            with torch.autocast(x.device.type, dtype=self.autocast_dtype):
                return self._forward_chunked(x, lengths.to(x.device), chunk_frames, right_context_frames).float()
        return self._forward_chunked(x, lengths.to(x.device), chunk_frames, right_context_frames)

    def forward_windows_sequential(
        self, x: torch.Tensor, lengths: torch.Tensor, chunk_frames: int, right_context_frames: int
    ) -> torch.Tensor:
        """Reference for chunked ``forward``: one ``forward_window`` call per chunk, as a stream runs.

        (batch, frames, feature_dim) -> log-probs (batch, frames, num_tokens).
        """
        batch, frames = x.shape[:2]
        state = self.initial_state(batch, x.device)
        outputs = []
        for start in range(0, frames, chunk_frames):
            end = min(start + chunk_frames + right_context_frames, frames)
            window_lengths = (lengths.to(x.device) - start).clamp(0, end - start)
            out, state = self.forward_window(x[:, start:end], window_lengths, chunk_frames, state)
            outputs.append(out)
        return torch.cat(outputs, dim=1)

    def _forward_chunked(self, x: torch.Tensor, lengths: torch.Tensor, chunk_frames: int, right_context_frames: int) -> torch.Tensor:
        """All windows of a batch at once; the same function as ``forward_windows_sequential``.

        The utterance (batch, frames, dim) is zero-padded to ``windows * chunk_frames +
        right_context_frames`` frames and cut into ``windows`` overlapping windows of
        ``chunk_frames + right_context_frames`` frames: (batch * windows, window_frames, dim).
        Per layer, only the forward direction over the chunk parts is sequential (it
        carries its state from chunk to chunk: one call per chunk, giving the state at each
        chunk's end); the lookahead parts (from those states) and the backward direction
        (from zeros at each window's end) run as one call over all windows. Frames past a
        window's valid length are padding and never reach a valid frame. About 2-4x faster
        than one window at a time for training batches on a CPU.
        """
        batch, frames, dim = x.shape
        chunk, rc = chunk_frames, right_context_frames
        windows = -(-frames // chunk)
        window_frames = chunk + rc
        padded = torch.nn.functional.pad(x, (0, 0, 0, windows * chunk + rc - frames))
        # (batch, windows, dim, window_frames) -> (batch * windows, window_frames, dim)
        layer_in = padded.unfold(1, window_frames, chunk).permute(0, 1, 3, 2).reshape(batch * windows, window_frames, dim)
        starts = torch.arange(windows, device=x.device) * chunk
        window_lengths = (lengths.unsqueeze(1) - starts.unsqueeze(0)).clamp(0, window_frames).reshape(-1)
        hidden = self.config.hidden_size
        for layer in range(self.config.num_layers):
            fwd_lstm = self.forward_lstms[layer]
            chunk_inputs = layer_in.reshape(batch, windows, window_frames, -1)[:, :, :chunk].unbind(1)
            state = (x.new_zeros(1, batch, hidden), x.new_zeros(1, batch, hidden))
            chunk_outputs, h_ends, c_ends = [], [], []
            for chunk_input in chunk_inputs:  # unbind: its backward is one stack, not one zero-fill per chunk
                out, state = fwd_lstm(chunk_input, state)
                chunk_outputs.append(out)
                h_ends.append(state[0])
                c_ends.append(state[1])
            fwd = torch.stack(chunk_outputs, dim=1).reshape(batch * windows, chunk, hidden)
            if rc > 0:
                # (1, batch, windows, hidden) -> (1, batch * windows, hidden), window index fastest
                h0 = torch.stack(h_ends, dim=2).reshape(1, batch * windows, hidden)
                c0 = torch.stack(c_ends, dim=2).reshape(1, batch * windows, hidden)
                fwd_rc, _ = fwd_lstm(layer_in[:, chunk:], (h0, c0))
                fwd = torch.cat([fwd, fwd_rc], dim=1)
            layer_in = self._add_backward(layer, layer_in, window_lengths, fwd)
        chunk_out = layer_in.reshape(batch, windows, window_frames, -1)[:, :, :chunk].reshape(batch, windows * chunk, -1)
        return self.output(chunk_out[:, :frames]).log_softmax(dim=-1)

    def latency_ms(self, chunk_frames: int, right_context_frames: int, frame_ms: float) -> float:
        """Algorithmic latency (chunk + lookahead) in milliseconds."""
        lookahead = right_context_frames if self.config.bidirectional else 0
        return (chunk_frames + lookahead) * frame_ms


def quantize_model(model: BiLSTMCTC, mode: str = "none") -> BiLSTMCTC:
    """``mode`` "int8": a copy with dynamically quantised int8 LSTMs and output layer (CPU
    only: weights int8, activations quantised per call by their range), run ``row_wise``;
    "bf16": a copy with bfloat16 weights whose forward passes run under CPU autocast
    (float32 inputs, outputs and state; fast where the CPU has native bfloat16, AVX512-BF16
    or AMX);
    "none": ``model`` itself."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {mode!r}")
    if mode == "none":
        return model
    if next(model.parameters()).device.type != "cpu":
        raise ValueError(f"{mode} inference runs on the CPU only; the model is on {next(model.parameters()).device}")
    if mode == "bf16":
        copy = BiLSTMCTC(model.config)
        copy.load_state_dict(model.state_dict())
        copy.to(torch.bfloat16).eval().autocast_dtype = torch.bfloat16
        return copy
    import warnings

    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao, not installed here
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        quantized = torch.ao.quantization.quantize_dynamic(model.eval(), {nn.LSTM, nn.Linear}, dtype=torch.qint8)
    quantized.row_wise = True
    return quantized
