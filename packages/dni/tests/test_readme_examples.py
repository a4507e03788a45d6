"""The three usage examples of pytorch-dni's README run with only the import changed.

Each example is the README text verbatim except for ``from dni import`` → ``from altgrad.dni import`` and two
typos of the README that fail with any implementation (listed in ``TYPO_FIXES``). The README's placeholders
(``WhateverNetwork``, ``input``, ``epoch``, ...) are supplied as globals.
"""

import textwrap

import torch
import torch.nn.functional as F
from torch import nn, optim

EXAMPLE_1 = """
from dni import DNI

# Parent network, can be anything extending nn.Module
net = WhateverNetwork(**kwargs)
opt = optim.Adam(net.parameters(), lr=0.001)

# use DNI to optimize this network
net = DNI(net, grad_optim='adam', grad_lr=0.0001)

# after that we go about our business as usual
for e in range(epoch):
  opt.zero_grad()
  output = net(input, *args)
  loss = criterion(output, target_output)
  loss.backward()

  # Optional: do this to __also__ update net's weight using backprop
  # opt.step()
"""

EXAMPLE_2 = """
from dni import *

class Net(nn.Module):
  def __init__(self, num_layers=3, hidden_size=256, dni_layers=[]):
    super(Net, self).__init__()
    self.num_layers = num_layers
    self.hidden_size = hidden_size

    self.net = [self.dni(self.layer(
        image_size*image_size if l == 0 else hidden_size,
        hidden_size
    )) if l in dni_layers else self.layer(
        image_size*image_size if l == 0 else hidden_size,
        hidden_size
    ) for l in range(self.num_layers)]
    self.final = self.layer(hidden_size, 10)

    # bind layers to this class (so that they're searchable by pytorch)
    for ctr, n in enumerate(self.net):
      setattr(self, 'layer'+str(ctr), n)

  def layer(self, input_size, hidden_size):
    return nn.Sequential(
      nn.Linear(input_size, hidden_size),
      nn.BatchNorm1d(hidden_size)
    )

  # create a DNI wrapper layer, recursive=False implies treat this layer as a leaf module
  def dni(self, layer):
    d = DNI(layer, hidden_size=256, grad_optim='adam', grad_lr=0.0001, recursive=False)
    return d

  def forward(self, x):
    output = x.view(-1, image_size*image_size)
    for layer in self.net:
      output = F.relu(layer(output))
    output = self.final(output)
    return F.log_softmax(output, dim=-1)

net = Net(num_layers=3, dni_layers=[1,2,3])

# use the gradient descent to optimize layers not optimized by DNI
opt = optim.Adam(net.final.parametes(), lr=0.001)

# after that we go about our business as usual
for e in range(epoch):
  opt.zero_grad()
  output = net(input)
  loss = criterion(output, target_output)
  loss.backward()
"""

EXAMPLE_3 = """
from dni import *

# Custom DNI network
class MyCustomDNI(DNINetwork):

  def __init__(self, input_size, hidden_size, output_size, num_layers=2, bias=True):

    super(LinearDNI, self).__init__(input_size, hidden_size, output_size)

    self.input_size = input_size
    self.hidden_size = hidden_size * 4
    self.output_size = output_size
    self.num_layers = num_layers
    self.bias = bias

    self.net = [self.layer(
        input_size if l == 0 else self.hidden_size,
        self.hidden_size
    ) for l in range(self.num_layers)]

    # bind layers to this class (so that they're searchable by pytorch)
    for ctr, n in enumerate(self.net):
      setattr(self, 'layer'+str(ctr), n)

    # final layer (yeah, no kidding)
    self.final = nn.Linear(self.hidden_size, output_size)

  def layer(self, input_size, hidden_size):
      return nn.Linear(input_size, hidden_size)

  def forward(self, input, hidden):
    output = input
    for layer in self.net:
      output = F.relu(layer(output))
    output = self.final(output)

    return output, None

# Custom network, can be anything extending nn.Module
net = WhateverNetwork(**kwargs)
opt = optim.Adam(net.parameters(), lr=0.001)

# use DNI to optimize this network with MyCustomDNI, pass custom params to the DNI nets
net = DNI(net, grad_optim='adam', grad_lr=0.0001, dni_network=MyCustomDNI,
      dni_params={'num_layers': 3, 'bias': True})

# after that we go about our business as usual
for e in range(epoch):
  opt.zero_grad()
  output = net(input, *args)
  loss = criterion(output, target_output)
  loss.backward()
"""

# README typos that no implementation can make work (documented in docs/dni/index.md).
TYPO_FIXES = {
    "net.final.parametes()": "net.final.parameters()",  # misspelt method
    "super(LinearDNI, self)": "super(MyCustomDNI, self)",  # MyCustomDNI is not a LinearDNI subclass
}


def run_example(source: str, **placeholders):
    source = textwrap.dedent(source).replace("from dni import", "from altgrad.dni import")
    for wrong, right in TYPO_FIXES.items():
        source = source.replace(wrong, right)
    torch.manual_seed(0)
    namespace = {"nn": nn, "F": F, "optim": optim, "torch": torch, **placeholders}
    exec(compile(source, "<README example>", "exec"), namespace)
    return namespace


def whatever_network():
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def placeholders():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    return {
        "WhateverNetwork": whatever_network,
        "kwargs": {},
        "args": (),
        "epoch": 20,
        "input": x,
        "target_output": x[:, :4].argmax(1),
        "criterion": nn.CrossEntropyLoss(),
    }


def test_example_1_dni_on_every_leaf_module():
    ns = run_example(EXAMPLE_1, **placeholders())
    net = ns["net"]
    assert sorted(net.wrapped_modules()) == ["0", "2"]
    assert torch.isfinite(ns["loss"])
    assert any(torch.count_nonzero(p) for p in net.synthesizer_parameters())  # synthesizers learned


def test_example_2_dni_on_chosen_layers():
    ph = placeholders()
    g = torch.Generator().manual_seed(1)
    ph.update(
        image_size=8,
        input=torch.randn(32, 1, 8, 8, generator=g),
        target_output=torch.randint(0, 10, (32,), generator=g),
    )
    ns = run_example(EXAMPLE_2, **ph)
    net = ns["net"]
    assert type(net.layer1).__name__ == "DNI"
    assert type(net.layer2).__name__ == "DNI"
    assert type(net.layer0).__name__ == "Sequential"
    assert "layer1.interfaces.root.synthesizer.final.weight" in net.state_dict()
    assert torch.isfinite(ns["loss"])


def test_example_3_custom_dni_network():
    ns = run_example(EXAMPLE_3, **placeholders())
    net = ns["net"]
    synth = net.interface("0").synthesizer
    assert type(synth).__name__ == "MyCustomDNI"
    assert synth.num_layers == 3
    assert synth.hidden_size == 256 * 4
    assert torch.isfinite(ns["loss"])


def test_the_readme_text_needs_only_the_import_and_typo_changes():
    for example in (EXAMPLE_1, EXAMPLE_2, EXAMPLE_3):
        assert "from dni import" in example
    assert "parametes()" in EXAMPLE_2
    assert "super(LinearDNI, self)" in EXAMPLE_3
