"""The examples at the end of each ``sinkscope ... --help`` (argparse epilogs, shown verbatim).

:data:`MAIN_EXAMPLES` ends ``sinkscope --help``; the others end the help of their subcommand:

>>> print(MAIN_EXAMPLES.strip())
sinkscope scan                                   # dinov2-small on the embedded images
sinkscope scan --model tiny-dinov2+sinks --method all --out runs/tiny
...
sinkscope models                                 # embedded model names
>>> SCAN_EXAMPLES.splitlines()[:2]
['examples:', '  sinkscope scan']
"""

from __future__ import annotations

#: Verbatim, blank first line included, as ``sinkscope --help`` has always printed it.
MAIN_EXAMPLES = """

    sinkscope scan                                   # dinov2-small on the embedded images
    sinkscope scan --model tiny-dinov2+sinks --method all --out runs/tiny
    sinkscope scan --model openai/clip-vit-large-patch14-336 --images photos/ --threshold 100 \\
                   --device cuda --dtype float16 --out runs/clip
    sinkscope scan --model smollm2-135m --text "The capital of France is" --method dims
    sinkscope scan --images photos/ --out runs/x --resume   # continue an interrupted scan
    sinkscope probe --dataset lfw-faces --out runs/probe    # linear probes per layer and token group
    sinkscope flow --out runs/flow                   # information pathways on mini-llava
    sinkscope decode --out runs/decode               # sink vs non-sink tokens decoding to the object word
    sinkscope report runs/x runs/probe runs/flow --out report.html   # one offline HTML page
    sinkscope figures                                # regenerate figures/out from figures/figures.toml
    sinkscope models                                 # embedded model names
"""


SCAN_EXAMPLES = """examples:
  sinkscope scan
  sinkscope scan --model tiny-dinov2+sinks --method all --out runs/tiny
  sinkscope scan --model openai/clip-vit-large-patch14-336 --images photos/ --threshold 100 \\
                 --layers 23 --device cuda --dtype float16 --out runs/clip
  sinkscope scan --model llava-hf/llava-1.5-7b-hf --images list.csv --method all --out runs/llava
  sinkscope scan --model smollm2-135m --text "The capital of France is" --method dims --tau 20
  sinkscope scan --images photos/ --out runs/x --resume
"""


PROBE_EXAMPLES = """examples:
  sinkscope probe                                       # dinov2-small on lfw-faces, all layers
  sinkscope probe --dataset textile --max-images 600 --groups cls,mean,random --out runs/textile
  sinkscope probe --model openai/clip-vit-large-patch14-336 --dataset photos.csv --label object \\
                  --label lighting --sink-rule norm:100 --groups sink,nonsink,cls,matched --device cuda
  sinkscope probe --dataset digits --label col --groups random,sink   # position regression (R2)
"""


FLOW_EXAMPLES = """examples:
  sinkscope flow                                     # mini-llava (trained projector) on one embedded photo
  sinkscope flow --model tiny-llava+sinks --analysis propagation --analysis knockout --stride 2
  sinkscope flow --model llava-hf/llava-1.5-7b-hf --images cat.jpg --prompt "What animal is this?" \\
                 --sink-rule norm:100 --generate 8 --device cuda --dtype float16 --out runs/llava-flow
  sinkscope flow --model dinov2-small --analysis rollout    # ViT only
"""


DECODE_EXAMPLES = """examples:
  sinkscope decode                                   # mini-llava on 40 lfw-faces images (its declared topk:4 surrogate)
  sinkscope decode --dataset digits --max-images 100 --out runs/decode-digits
  sinkscope decode --model llava-hf/llava-1.5-7b-hf --dataset cats_people.csv --word cat=cat,cats,kitten \\
                   --word person=person,man,woman --sink-rule norm:100 --max-images 0 --device cuda
"""


REPORT_EXAMPLES = """examples:
  sinkscope report sinkscope-out                             # the default scan's run folder
  sinkscope report runs/scan runs/probe runs/flow --out report.html
  sinkscope report runs/clip --title "CLIP ViT-L/14-336 sinks" --out clip.html
"""
