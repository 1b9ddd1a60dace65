using CsCheck;
using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Interop.Support;

namespace QcowTier.Tests.Model;

/// <summary>
/// Random operation sequences (writes of random data at random offsets and lengths, write-zeroes with and
/// without unmap, discards, resizes, flushes, close/reopen) against an in-memory byte-array model. After
/// every sequence the full content equals the model, through us and through qemu-img convert, and
/// qemu-img check is clean. CsCheck shrinks a failure to a minimal sequence.
/// </summary>
public sealed class ModelBasedTests
{
    /// <summary>An abstract step; turned into a concrete <see cref="Op"/> against the disk's size at that point.</summary>
    public sealed record Step(int Kind, int Where, int HowLong, int Seed)
    {
        public override string ToString() => $"({Kind},{Where},{HowLong},{Seed})";
    }

    /// <summary>A whole case: the initial size in sectors, the API, whether the metadata caches are tiny (evictions), and the steps.</summary>
    public sealed record Case(int Sectors, Api Api, bool TinyCaches, Step[] Steps)
    {
        public override string ToString() => $"sectors={Sectors} api={Api} tiny={TinyCaches} steps=[{string.Join(",", Steps.Select(s => s.ToString()))}]";
    }

    private static readonly Gen<Step> GenStep =
        Gen.Select(Gen.Int[0, 99], Gen.Int[0, int.MaxValue], Gen.Int[0, int.MaxValue], Gen.Int).Select((k, w, l, s) => new Step(k, w, l, s));

    private static Gen<Case> GenCase(int maxSectors) =>
        Gen.Select(Gen.Int[1, maxSectors], Gen.Int[0, 2], Gen.Bool, GenStep.Array[1, 30]).Select((n, a, tiny, steps) => new Case(n, (Api)a, tiny, steps));

    /// <summary>A length from one of several regimes: tiny, around a cluster, several clusters, large.</summary>
    private static long Length(int sel, int cs, long room)
    {
        long len = (sel % 5) switch
        {
            0 => 1 + sel / 5 % 600,
            1 => cs - 8 + sel / 5 % 17,
            2 => (long)cs * (1 + sel / 5 % 4),
            3 => 1 + sel / 5 % (4 * cs + 1000),
            _ => 1 + sel / 5 % (300 << 10),
        };
        return Math.Clamp(len, 1, Math.Max(1, room));
    }

    /// <summary>An offset: anywhere, cluster-aligned, near a cluster boundary, or near the end.</summary>
    private static long Offset(int sel, int cs, long size)
    {
        var clusters = Math.Max(1, (size + cs - 1) / cs);
        var off = (sel % 4) switch
        {
            0 => (long)(sel / 4) % size,
            1 => sel / 4 % clusters * cs,
            2 => sel / 4 % clusters * cs + (sel / 4 % 201) - 100,
            _ => size - 1 - sel / 4 % Math.Min(size, 3L * cs),
        };
        return Math.Clamp(off, 0, size - 1);
    }

    private static Op Concretize(Step s, long size, int cs)
    {
        var k = s.Kind;
        if (k < 45)
        {
            var off = Offset(s.Where, cs, size);
            var len = (int)Length(s.HowLong, cs, size - off);
            return new WriteOp(off, Scenarios.Random(new Random(s.Seed), len));
        }
        if (k < 65)
        {
            var off = Offset(s.Where, cs, size);
            return new ZeroOp(off, Length(s.HowLong, cs, size - off), Unmap: k >= 55);
        }
        if (k < 80)
        {
            var off = Offset(s.Where, cs, size);
            return new DiscardOp(off, Length(s.HowLong, cs, size - off));
        }
        if (k < 87)
        {
            var grow = 512L * (1 + s.HowLong % (8 * cs / 512 + 16));
            return new ResizeOp(Math.Min(size + grow, 8L << 20));
        }
        return k < 95 ? new FlushOp() : new ReopenOp();
    }

    private static void RunCase(ImageFormat f, Case c)
    {
        using var dir = new TempDir();
        var path = dir.File("model.qcow2");
        var size = 512L * c.Sectors;
        var model = new ContentModel(size, f.ClusterSize);
        // Tiny caches: two L2 tables and two refcount blocks, so dirty tables are written back by eviction mid-operation.
        var open = c.TinyCaches
            ? new QcowOpenOptions { L2CacheSize = 2L * f.ClusterSize, RefcountCacheSize = 2L * f.ClusterSize }
            : new QcowOpenOptions();
        var first = QcowImage.Create(path, size, f.Ours());
        if (c.TinyCaches)
        {
            first.Dispose();
            first = QcowImage.Open(path, open);
        }
        using (var runner = new OurRunner(first, () => QcowImage.Open(path, open), c.Api))
        {
            foreach (var step in c.Steps)
            {
                var op = Concretize(step, model.Size, f.ClusterSize);
                runner.Apply(op);
                model.Apply(op);
                runner.Image.Size.Should().Be(model.Size);
            }
            QemuTools.AssertBytesEqual(model.Bytes, runner.ReadAll(), "our read-back vs the model");
        }
        QemuTools.AssertClean(path);
        QemuTools.AssertBytesEqual(model.Bytes, QemuTools.ReadRaw(path, dir), "qemu-img convert vs the model");
    }

    public static TheoryData<int, int, bool, bool, bool> Formats() => new()
    {
        // cluster size, refcount bits, v2, lazy refcounts, preallocation=metadata
        { 512, 16, true, false, false },
        { 512, 1, false, false, false },
        { 4096, 16, false, true, false },
        { 4096, 64, false, false, true },
        { 65536, 2, false, false, false },
        { 65536, 16, true, false, true },
        { 4096, 4, false, false, false },
        { 512, 8, false, true, false },
        { 65536, 32, false, false, false },
    };

    [Theory]
    [MemberData(nameof(Formats))]
    public void RandomSequencesMatchTheModel(int cs, int bits, bool v2, bool lazy, bool prealloc)
    {
        var f = new ImageFormat(cs, bits, v2, lazy, prealloc);
        // Disks of up to 1.5 MiB, so small clusters span many L2 tables and refcount blocks.
        GenCase(3072).Sample(c => RunCase(f, c), iter: 25 * Crash.CrashTests.Stress, threads: 1, print: c => c.ToString());
    }

    /// <summary>Longer sequences, more of them.</summary>
    [Theory]
    [Trait("Category", "Heavy")]
    [MemberData(nameof(Formats))]
    public void ManyLongRandomSequencesMatchTheModel(int cs, int bits, bool v2, bool lazy, bool prealloc)
    {
        var f = new ImageFormat(cs, bits, v2, lazy, prealloc);
        Gen.Select(Gen.Int[1, 6144], Gen.Int[0, 2], Gen.Bool, GenStep.Array[20, 80]).Select((n, a, tiny, steps) => new Case(n, (Api)a, tiny, steps))
            .Sample(c => RunCase(f, c), iter: 60 * Crash.CrashTests.Stress, threads: 2, print: c => c.ToString());
    }

    /// <summary>2 MiB clusters: few, large clusters, where every partial write pads a whole cluster.</summary>
    [Fact]
    public void RandomSequencesWithHugeClusters()
    {
        var f = new ImageFormat(2 << 20, 16, V2: false, Lazy: false);
        GenCase(12288).Sample(c => RunCase(f, c), iter: 6, threads: 1, print: c => c.ToString());
    }
}
