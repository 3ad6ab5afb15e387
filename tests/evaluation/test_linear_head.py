import torch

from evaluation.linear_head import fit_linear_head, penalised_loss


def _data(n=120, d=5, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g) * 3
    labels = torch.arange(n) % classes
    x = centers[labels] + torch.randn(n, d, generator=g) * 0.5
    return x * torch.tensor([1.0, 10.0, 0.1, 1.0, 100.0]) + 7.0, labels  # scales and offset: the standardisation


def test_fits_separable_classes():
    x, y = _data()
    head = fit_linear_head(x, y, 3)
    assert (head(x).argmax(1) == y).float().mean() == 1.0


def test_solution_is_a_stationary_point_of_the_stated_objective():
    # Optimality check independent of the solver: the gradient of the penalised loss, written out here, at the
    # returned weights (mapped back to standardised features) must vanish.
    x, y = _data(seed=1)
    wd = 1e-2
    head = fit_linear_head(x, y, 3, weight_decay=wd)
    xd = x.double()
    mean, std = xd.mean(0), xd.std(0, unbiased=False)
    z = (xd - mean) / std
    weight = (head.weight.double() * std).requires_grad_()  # W_z = W_x * std
    bias = (head.bias.double() + head.weight.double() @ mean).requires_grad_()
    loss = penalised_loss(z, y, weight, bias, wd)
    gw, gb = torch.autograd.grad(loss, (weight, bias))
    probs = torch.softmax(z @ weight.T + bias, 1)
    onehot = torch.nn.functional.one_hot(y, 3).double()
    by_hand = (probs - onehot).T @ z / len(y) + wd * weight  # d/dW of mean CE + wd/2 |W|^2
    assert torch.allclose(gw, by_hand, atol=1e-10)
    assert gw.abs().max() < 1e-4 and gb.abs().max() < 1e-4
