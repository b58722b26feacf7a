import pytest
import torch

from edm_lightning.data import ImageTensorDataset, convert_images
from edm_lightning.errors import ConfigError


def test_grey_to_colour_repeats_the_channel():
    grey = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    colour = convert_images(grey, (3, 28, 28))
    assert colour.shape == (4, 3, 28, 28) and colour.dtype == torch.uint8
    assert torch.equal(colour[:, 0], grey[:, 0]) and torch.equal(colour[:, 2], grey[:, 0])


def test_colour_to_grey_and_resize():
    colour = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    grey = convert_images(colour, (1, 28, 28))
    assert grey.shape == (5, 1, 28, 28) and grey.dtype == torch.uint8


def test_constant_image_survives_resizing():
    flat = torch.full((2, 1, 28, 28), 200, dtype=torch.uint8)
    assert torch.all(convert_images(flat, (3, 32, 32)) == 200)


def test_matching_shape_is_returned_unchanged():
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    assert convert_images(images, (1, 28, 28)) is images


def test_unsupported_channel_change_is_refused():
    with pytest.raises(ConfigError, match="only 1 <-> 3"):
        convert_images(torch.zeros(1, 2, 8, 8, dtype=torch.uint8), (3, 8, 8))


def test_dataset_serves_unit_range_floats_and_labels():
    images = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    dataset = ImageTensorDataset(images, torch.tensor([3]))
    x, y = dataset[0]
    assert x.dtype == torch.float32 and x.tolist() == [[[0.0, 1.0]]] and y == 3
    assert torch.equal(ImageTensorDataset(images)[0], x)  # unlabelled: the image alone


def test_dataset_rejects_float_storage_and_label_mismatch():
    with pytest.raises(ValueError, match="uint8"):
        ImageTensorDataset(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        ImageTensorDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3))


def test_a_batch_is_cut_in_one_operation_and_equals_the_item_by_item_batch():
    from torch.utils.data import default_collate

    from edm_lightning.data.images import BatchTensorDataset, batch_loader

    images = torch.randint(0, 256, (10, 1, 4, 4), dtype=torch.uint8)
    labels = torch.arange(10)
    dataset = ImageTensorDataset(images, labels)
    indices = [7, 2, 5]
    x, y = dataset.__getitems__(indices)
    expected_x, expected_y = default_collate([dataset[i] for i in indices])
    torch.testing.assert_close(x, expected_x)
    assert torch.equal(y, expected_y)
    unlabelled = ImageTensorDataset(images)
    torch.testing.assert_close(unlabelled.__getitems__(indices), default_collate([unlabelled[i] for i in indices]))
    loader = batch_loader(dataset, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    seen = torch.cat([batch_y for _, batch_y in loader])
    assert sorted(seen.tolist()) == list(range(10)) and [len(b[1]) for b in loader] == [4, 4, 2]
    pairs = BatchTensorDataset(torch.arange(6.0), torch.arange(6) * 10)
    assert [t.tolist() for t in pairs.__getitems__([4, 1])] == [[4.0, 1.0], [40, 10]]
