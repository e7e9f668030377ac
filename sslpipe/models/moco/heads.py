"""Projection head of MoCo v2."""

from __future__ import annotations

from torch import Tensor, nn

from sslpipe.models.moco.checks import check_positive_int


class ProjectionHead(nn.Module):
    """Two-layer MLP that maps backbone features to the space of the contrastive loss.

    ``Linear(input_dim, hidden_dim) -> ReLU -> Linear(hidden_dim, output_dim)``, as introduced
    by MoCo v2 (Chen et al., 2020, "Improved Baselines with Momentum Contrastive Learning",
    Sec. 3: "a 2-layer MLP head (hidden layer 2048-d, with ReLU)", output 128-d). The head is
    discarded after pre-training; only the backbone is exported.

    Args:
        input_dim: Width of the backbone feature (512 for ResNet-18, 2048 for ResNet-50).
        hidden_dim: Width of the hidden layer; 2048 in MoCo v2.
        output_dim: Width of the embedding fed to the loss; 128 in MoCo v2.

    Shapes:
        forward: (N, input_dim) -> (N, output_dim).
    """

    def __init__(self, input_dim: int, *, hidden_dim: int = 2048, output_dim: int = 128) -> None:
        super().__init__()
        check_positive_int(input_dim, "ProjectionHead input_dim")
        check_positive_int(hidden_dim, "ProjectionHead hidden_dim")
        check_positive_int(output_dim, "ProjectionHead output_dim")
        self.input_dim = input_dim
        self.hidden_dim = hidden_dim
        self.output_dim = output_dim
        # No BatchNorm: MoCo v2's head is a plain MLP (BN in the head came later, with v3).
        self.layers = nn.Sequential(
            nn.Linear(input_dim, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, output_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Project features of shape (N, input_dim) to embeddings of shape (N, output_dim)."""
        out: Tensor = self.layers(x)
        return out
