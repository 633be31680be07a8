"""The resnet-sweep command and its tools: split, predict."""
