using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Interop.Support;

namespace QcowTier.Tests.Crash;

/// <summary>
/// Power cuts with a QEMU external data file: the cut hits a write of the image or of the data file, and
/// each file keeps only what was flushed. Guest data in the data file must be durable before any L2
/// entry pointing at it is, so qemu-img check finds no corruption and every flushed write survives.
/// </summary>
public sealed class DataFileCrashTests
{
    private const int Cs = 4096;
    private const long Size = 1L << 20;

    private static byte[] Data(int seed, int length)
    {
        var b = new byte[length];
        new Random(seed).NextBytes(b);
        return b;
    }

    private static readonly Op[] Setup =
    [
        new WriteOp(0, Data(1, 100 << 10)),
        new ZeroOp(8192, 8192, Unmap: false),
    ];

    private static readonly Op[] Ops =
    [
        new WriteOp(200 << 10, Data(2, 70000)),
        new WriteOp(10, Data(3, 100)),
        new FlushOp(),
        new DiscardOp(16 << 10, 32 << 10),
        new ZeroOp(600 << 10, 64 << 10, Unmap: true),
        new WriteOp(20 << 10, Data(4, 5000)),
        new FlushOp(),
        new WriteOp(900 << 10, Data(5, 30000)),
        new ZeroOp(0, 4096, Unmap: false),
    ];

    [Theory]
    [InlineData(false, false)]
    [InlineData(false, true)]
    [InlineData(true, false)]
    [InlineData(true, true)]
    public void Power_cut_in_either_file_loses_nothing_flushed(bool raw, bool cutInDataFile)
    {
        var total = Run(raw, cutInDataFile, long.MaxValue).Writes;
        total.Should().BeGreaterThan(0);
        using var dir = new TempDir();
        foreach (var n in CrashHarness.CutPoints(total, 14))
        {
            var (outcome, data, _) = Run(raw, cutInDataFile, n);
            var label = $"raw{raw}-data{cutInDataFile}-cut{n}of{total}";
            if (n <= total)
            {
                outcome.Cut.Should().BeTrue(label);
            }
            File.WriteAllBytes(dir.File("crash.qcow2"), outcome.Crashed);
            File.WriteAllBytes(dir.File("crash.data"), data);
            var check = Qemu.RunIn(dir.Path, "qemu-img", "check", "-f", "qcow2", "crash.qcow2");
            check.ExitCode.Should().BeOneOf([0, 3], $"{label}: no corruption, leaks allowed:\n{check.StdOut}{check.StdErr}");

            byte[] ours;
            using (var img = QcowImage.OpenOn(new FaultInjectingStorage(outcome.Crashed, "crash.qcow2"), new QcowOpenOptions { ReadOnly = true },
                (_, _, _) => new FaultInjectingStorage(data, "crash.data")))
            {
                ours = new byte[img.Size];
                img.Read(0, ours);
            }
            CrashHarness.AssertPossibleContent(outcome, ours, label);
            Qemu.RunIn(dir.Path, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", "crash.qcow2", "crash.raw").EnsureSuccess();
            QemuTools.AssertBytesEqual(ours, File.ReadAllBytes(dir.File("crash.raw")), $"{label}: our read vs qemu-img convert");
        }
    }

    private static (CrashHarness.Outcome Outcome, byte[] Data, long Writes) Run(bool raw, bool cutInDataFile, long cutAt)
    {
        var image = new FaultInjectingStorage(name: "crash.qcow2");
        var dataFile = new FaultInjectingStorage(name: "crash.data");
        Func<string, bool, bool, Storage.ImageStorage> factory = (_, _, _) => dataFile;
        var live = new ContentModel(Size, Cs);
        var img = QcowImage.CreateOn(image, Size, new QcowCreateOptions { ClusterSize = Cs, DataFile = "crash.data", DataFileRaw = raw }, factory);
        foreach (var op in Setup)
        {
            Apply(img, op);
            live.Apply(op);
        }
        img.Dispose();
        img = QcowImage.OpenOn(image, new QcowOpenOptions { L2CacheSize = 2 * Cs, RefcountCacheSize = 2 * Cs }, factory);
        var flushed = live.Clone();
        var after = new List<Effect>();
        var cut = cutInDataFile ? dataFile : image;
        var start = cut.WriteCount;
        cut.CutAtWrite(cutAt);
        var wasCut = false;
        try
        {
            foreach (var op in Ops)
            {
                switch (op)
                {
                    case WriteOp w: after.Add(new Effect(w.Offset, w.Data.Length, w.Data)); break;
                    case ZeroOp z: after.Add(new Effect(z.Offset, z.Length, null)); break;
                    case DiscardOp d: after.Add(new Effect(d.Offset, d.Length, null)); break;
                }
                Apply(img, op);
                live.Apply(op);
                if (op is FlushOp)
                {
                    flushed = live.Clone();
                    after.Clear();
                }
            }
            img.Dispose();
            flushed = live.Clone();
            after.Clear();
        }
        catch (Exception e) when (cut.IsCut)
        {
            _ = e;
            wasCut = true;
            try
            {
                img.Dispose();
            }
            catch (Exception e2) when (cut.IsCut)
            {
                _ = e2;
            }
        }
        var outcome = new CrashHarness.Outcome
        {
            Crashed = image.DurableImage(),
            Flushed = flushed,
            After = after,
            PossibleSizes = [Size],
            Cut = wasCut,
            Writes = cut.WriteCount - start,
        };
        return (outcome, dataFile.DurableImage(), outcome.Writes);
    }

    private static void Apply(QcowImage img, Op op)
    {
        switch (op)
        {
            case WriteOp w: img.Write(w.Offset, w.Data); break;
            case ZeroOp z: img.WriteZeroes(z.Offset, z.Length, z.Unmap); break;
            case DiscardOp d: img.Discard(d.Offset, d.Length); break;
            case FlushOp: img.Flush(); break;
            default: throw new ArgumentException(op.ToString(), nameof(op));
        }
    }
}
