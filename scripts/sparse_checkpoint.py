"""Sparse checkpoints for `pipequant plan` of models larger than the disk: config.json, bf16 safetensors files whose
headers are real and whose data regions are holes (each file truncated to its full size), and the index."""
import json
import os
import struct


def write_sparse_checkpoint(d, config, block_tensors, files=8):
    """Writes `config` and its tensors ([(name, shape)] of block b from block_tensors(b), the embedding first, the
    final norm and an untied lm_head last) over `files` files under d. Returns the apparent size in bytes."""
    os.makedirs(d)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    layers, hidden, vocab = config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]
    per_file = (layers + files - 1) // files
    weight_map, total = {}, 0
    for i in range(files):
        tensors = [("model.embed_tokens.weight", [vocab, hidden])] if i == 0 else []
        for b in range(i * per_file, min(layers, (i + 1) * per_file)):
            tensors += block_tensors(b)
        if i == files - 1:
            tensors += [("model.norm.weight", [hidden]), ("lm_head.weight", [vocab, hidden])]
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in tensors:
            n = 2
            for s in shape:
                n *= s
            header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        fname = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        with open(os.path.join(d, fname), "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)  # the data region: a hole
        weight_map.update({name: fname for name, _ in tensors})
        total += 8 + len(raw) + offset
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total
