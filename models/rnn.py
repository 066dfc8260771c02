"""Recurrent network (plain RNN, LSTM or GRU) from a sequence to a value or to class logits."""

import torch
from torch import nn

from kiln.spec import RNNSpec

CELLS: dict[str, type[nn.RNNBase]] = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class RNN(nn.Module):
    def __init__(self, spec: RNNSpec, in_shape: tuple[int, ...], out_features: int) -> None:
        super().__init__()
        self.in_shape = in_shape  # (steps, channels)
        self.rnn = CELLS[spec.cell](
            in_shape[1], spec.hidden_size, num_layers=spec.layers, batch_first=True,
            bidirectional=spec.bidirectional,
            dropout=spec.dropout if spec.layers > 1 else 0.0,  # torch applies it between stacked layers only
        )
        self.dropout = nn.Dropout(spec.dropout)
        self.head = nn.Linear(spec.hidden_size * (2 if spec.bidirectional else 1), out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x.unflatten(1, self.in_shape))
        hidden = self.rnn.hidden_size
        # The final state of each direction: forward at the last step, backward at the first.
        last = torch.cat([out[:, -1, :hidden], out[:, 0, hidden:]], dim=1) if self.rnn.bidirectional else out[:, -1]
        return self.head(self.dropout(last))
