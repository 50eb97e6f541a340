"""A PyTorch training loop: an MLP on scikit-learn's digits."""

import torch
from sklearn.datasets import load_digits

from ps_worker import DistributedOptimizer, shard

torch.manual_seed(0)
x, y = load_digits(return_X_y=True)
x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
train_x, train_y, test_x, test_y = x[:1500], y[:1500], x[1500:], y[1500:]
train_x, train_y = shard(train_x), shard(train_y)  # this rank's share ($RANK of $WORLD_SIZE)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
optimizer = DistributedOptimizer(model, job_id="digits", mode="sync", optimizer="adam", lr=0.003)
for _epoch in range(20):
    for i in range(0, len(train_x), 32):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(train_x[i : i + 32]), train_y[i : i + 32])
        loss.backward()
        optimizer.step()
optimizer.join()  # wait for every rank to finish; the model then holds the final weights
with torch.no_grad():
    accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
print(f"test accuracy {accuracy:.4f}")
