"""Offline datasets: procedural generators and the IDX / CIFAR-10 loaders on tiny generated files."""
import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

import tasks
from tasks import data
from tasks.data import DatasetNotFoundError, idx


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    data.clear_cache()
    yield
    data.clear_cache()


def write_idx(path, array, gz=False):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def make_mnist(root, n_train=20, n_test=10, gz=False, folder="MNIST/raw"):
    directory = root / folder
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8)}
    for name, array in arrays.items():
        write_idx(directory / name, array, gz=gz)
    return arrays


def make_cifar(root, per_batch=4):
    directory = root / "cifar-10-batches-py"
    directory.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, per_batch).tolist(), b"batch_label": name.encode()}
        with open(directory / name, "wb") as f:
            pickle.dump(batch, f)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path, gz):
    arrays = make_mnist(tmp_path, gz=gz)
    loaded = data.load_dataset("mnist", root=tmp_path)
    x, y = loaded.splits["train"]
    assert x.shape == (20, 1, 28, 28) and x.dtype == torch.uint8
    assert np.array_equal(x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(y.numpy(), arrays["train-labels-idx1-ubyte"].astype(np.int64))
    assert loaded.size("test") == 10


def test_idx_reads_wider_dtypes(tmp_path):
    values = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    write_idx(tmp_path / "ints", values)
    assert np.array_equal(idx.read_idx(tmp_path / "ints"), values)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="IDX"):
        idx.read_idx(tmp_path / "bad")


def test_mnist_task_through_env_var(tmp_path, monkeypatch):
    make_mnist(tmp_path, folder="FashionMNIST")
    task = tasks.get_task("cnn_fashion_bn")
    assert not task.available()
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    assert task.available()
    x, y = next(task.batches("train", seed=0))
    assert x.dtype == torch.float32 and x.shape == (task.batch_size, 1, 28, 28)
    assert abs(x.mean().item()) < 2 and y.max() < 10
    assert torch.isfinite(task.loss(task.init(0), (x, y)))
    assert "cnn_fashion_bn" in [t.name for t in tasks.get_suite("train")]


def test_cifar_roundtrip_and_task(tmp_path, monkeypatch):
    make_cifar(tmp_path)
    loaded = data.load_dataset("cifar10", root=tmp_path)
    assert loaded.size("train") == 20 and loaded.size("test") == 4
    assert loaded.splits["train"][0].shape == (20, 3, 32, 32)
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    task = tasks.get_task("cnn_cifar10")
    x, y = next(task.batches("test", seed=0))
    assert x.shape == (task.batch_size, 3, 32, 32)
    assert torch.isfinite(task.loss(task.init(0), (x, y)))


def test_missing_data_gives_clear_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="L2O_DATA"):
        data.load_dataset("mnist")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_dataset("mnist", root=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.*MNIST"):
        data.load_dataset("mnist", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="data_batch_1.*cifar-10-batches-py"):
        data.load_dataset("cifar10", root=tmp_path)
    assert "cnn_cifar10" not in [t.name for t in tasks.get_suite("heldout")]
    with pytest.raises(DatasetNotFoundError):
        next(tasks.get_task("cnn_cifar10").batches())


def test_procedural_datasets_are_deterministic():
    from tasks.data.mnist1d import generate_mnist1d
    a, b = generate_mnist1d(50, seed=3), generate_mnist1d(50, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], generate_mnist1d(50, seed=4)[0])
    assert a[0].shape == (50, 1, 40)


def test_sequence_targets():
    x, y = data.load_dataset("sort").first("train", 8)
    assert torch.equal(y, x.sort(1).values)
    x, y = data.load_dataset("parity").first("train", 8)
    assert torch.equal(y[:, -1], x.sum(1) % 2)
    x, y = data.load_dataset("reverse").first("test", 8)
    assert torch.equal(y, x.flip(1))
    x, y = data.load_dataset("modadd").first("train", 8)
    assert torch.equal(y, x.sum(1) % 23)


def test_char_corpus_windows_predict_next_char():
    corpus = data.load_dataset("chars")
    assert corpus.size("train") > 20_000
    x, y = next(tasks.get_task("transformer_charlm").batches("train", seed=0))
    assert x.shape == y.shape == (32, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_markov_language_is_learnable_and_deterministic():
    from tasks.data.markov import load_markov_data
    a, b = load_markov_data(32, seed=1), load_markov_data(32, seed=1)
    train = a.splits["train"]
    assert torch.equal(train, b.splits["train"]) and not torch.equal(train, load_markov_data(32, 2).splits["train"])
    assert int(train.min()) >= 0 and int(train.max()) < 32
    # next-token entropy given the previous token is far below the unigram entropy: there is
    # structure for a language model to learn (a few Zipf-weighted successors per token)
    pairs = torch.zeros(32, 32).index_put_((train[:-1], train[1:]), torch.ones(train.numel() - 1), accumulate=True)
    def entropy(p):
        return float(-(p * p.clamp_min(1e-12).log()).sum(-1))
    unigram = entropy(pairs.sum(0) / pairs.sum())
    conditional = sum(entropy(row / row.sum()) * row.sum() for row in pairs) / pairs.sum()
    assert conditional < 0.6 * unigram
    x, y = next(tasks.get_task("rnn_lstm_markov").batches("train", seed=0))
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_tied_recurrent_lm_shares_its_embedding():
    model = tasks.get_task("rnn_lstm_markov").init(0)
    assert model.head.weight is model.embedding.weight
    assert len(list(model.parameters())) == len(dict(model.named_parameters(remove_duplicate=False))) - 1


def test_digits_standardised_and_split():
    digits = data.load_dataset("digits")
    x, y = digits.splits["train"]
    assert x.shape[1:] == (1, 8, 8) and abs(x.mean().item()) < 1e-4
    assert digits.size("train") + digits.size("test") == 1797


# ------------------------------------------------------------------ unreadable / inconsistent files
def test_missing_reason_is_the_loaders_message(tmp_path):
    assert data.missing_reason("digits") is None
    assert "L2O_DATA" in data.missing_reason("mnist")
    assert "does not exist" in data.missing_reason("cifar10", root=tmp_path / "nowhere")
    make_mnist(tmp_path)
    (tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte").unlink()
    reason = data.missing_reason("mnist", root=tmp_path)
    assert "missing t10k-labels-idx1-ubyte" in reason and str(tmp_path / "MNIST/raw") in reason
    assert not data.is_available("mnist", root=tmp_path)


@pytest.mark.parametrize("split", ["train", "t10k"])
def test_idx_images_and_labels_of_different_counts_are_refused(tmp_path, split):
    make_mnist(tmp_path)
    labels = tmp_path / f"MNIST/raw/{split}-labels-idx1-ubyte"
    write_idx(labels, np.zeros(3, dtype=np.uint8))
    with pytest.raises(data.DatasetFormatError) as err:
        data.load_dataset("mnist", root=tmp_path)
    message = str(err.value)
    images = tmp_path / f"MNIST/raw/{split}-images-idx3-ubyte"
    assert str(images) in message and str(labels) in message and " 3 labels" in message
    assert ("20 images" if split == "train" else "10 images") in message


def test_corrupt_idx_files_name_the_file(tmp_path):
    make_mnist(tmp_path)
    bad = tmp_path / "MNIST/raw/train-labels-idx1-ubyte"
    bad.write_bytes(b"\x01\x02\x03\x04garbage")
    with pytest.raises(data.DatasetFormatError, match=f"{bad}.*bad magic number"):
        data.load_dataset("mnist", root=tmp_path)
    make_mnist(tmp_path / "gz", gz=True)
    bad_gz = tmp_path / "gz/MNIST/raw/t10k-images-idx3-ubyte.gz"
    bad_gz.write_bytes(bad_gz.read_bytes()[:40])       # truncated download
    with pytest.raises(data.DatasetFormatError, match=str(bad_gz)):
        data.load_dataset("mnist", root=tmp_path / "gz")
    (tmp_path / "gz/MNIST/raw/t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(data.DatasetFormatError, match="t10k-images-idx3-ubyte.gz"):
        data.load_dataset("mnist", root=tmp_path / "gz")


def test_truncated_or_inconsistent_cifar_batches_name_the_file(tmp_path):
    make_cifar(tmp_path)
    batch = tmp_path / "cifar-10-batches-py/data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(data.DatasetFormatError, match=f"{batch}.*CIFAR-10"):
        data.load_dataset("cifar10", root=tmp_path)
    with open(batch, "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3072), dtype=np.uint8), b"labels": [0, 1, 2]}, f)
    with pytest.raises(data.DatasetFormatError, match=f"{batch}: holds 4 images but 3 labels"):
        data.load_dataset("cifar10", root=tmp_path)
