"""Write `shapes` samples as files, for the routes that read folders (e.g. visual prompt tuning,
docs/training-features.md): a caption folder (`--dataset folder`: x.png beside x.txt, one
caption per line) and an ImageFolder pair (one sub-folder per shape, for
finetune_classification.py / eval_linear.py).

    python tools/shapes_folders.py --out data/shapes_files --num-train 2000 --num-val 500
    # -> data/shapes_files/captions/, data/shapes_files/classes/{train,val}/<shape>/

The training images are drawn with --seed (default 1, not the demo's 0: other images than
those it trained on); the validation images from the held-out split.
"""
import os
import sys

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import shapes  # noqa: E402
import utils  # noqa: E402


def write_captions(folder, data):
    os.makedirs(folder, exist_ok=True)
    for i, (pixels, captions) in enumerate(zip(data.images, data.captions)):
        Image.fromarray(pixels).save(os.path.join(folder, f'{i:06d}.png'))
        with open(os.path.join(folder, f'{i:06d}.txt'), 'w') as f:
            f.write('\n'.join(captions) + '\n')


def write_classes(folder, data):
    for i, (pixels, label) in enumerate(zip(data.images, data.labels)):
        class_dir = os.path.join(folder, shapes.CLASSNAMES[label])
        os.makedirs(class_dir, exist_ok=True)
        Image.fromarray(pixels).save(os.path.join(class_dir, f'{i:06d}.png'))


def main(argv=None):
    parser = utils.OneLineErrorParser('shapes_folders.py', description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', required=True, help='output directory (created)')
    parser.add_argument('--num-train', type=int, default=2000, help='training images (2000)')
    parser.add_argument('--num-val', type=int, default=500, help='held-out images of the ImageFolder (500)')
    parser.add_argument('--image-size', type=int, default=64, help='pixels (64, the demo size)')
    parser.add_argument('--seed', type=int, default=1, help='seed of the drawn images (1)')
    args = parser.parse_args(argv)
    try:
        utils.check_counts(args, positive=['num_train', 'num_val', 'image_size'])
        utils.check_output_path(args.out, '--out', is_dir=True)
    except ValueError as e:
        parser.error(str(e))
    train = shapes.generate('train', args.num_train, args.seed, args.image_size)
    val = shapes.generate('val', args.num_val, args.seed, args.image_size)
    write_captions(os.path.join(args.out, 'captions'), train)
    write_classes(os.path.join(args.out, 'classes', 'train'), train)
    write_classes(os.path.join(args.out, 'classes', 'val'), val)
    print(f"wrote {args.out}/captions ({args.num_train} image/caption pairs) and "
          f"{args.out}/classes/{{train,val}} ({args.num_train} / {args.num_val} images, "
          f"{len(shapes.CLASSNAMES)} classes)")


if __name__ == '__main__':
    main()
