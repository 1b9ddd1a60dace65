using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Interop.Support;

namespace QcowTier.Tests.Interop;

/// <summary>
/// The interop matrix: cluster sizes × refcount widths × compat × lazy refcounts (every legal combination),
/// with the same scattered, unaligned operation sequence applied by QEMU and by us.
/// </summary>
public sealed class InteropMatrixTests
{
    public static TheoryData<int, int, bool, bool> Formats()
    {
        var data = new TheoryData<int, int, bool, bool>();
        foreach (var f in ImageFormat.Matrix())
        {
            data.Add(f.ClusterSize, f.RefcountBits, f.V2, f.Lazy);
        }
        return data;
    }

    /// <summary>A subset with preallocation=metadata, on both sides.</summary>
    public static TheoryData<int, int, bool, bool> PreallocFormats() => new()
    {
        { 512, 16, true, false },
        { 4096, 1, false, true },
        { 65536, 16, false, false },
        { 65536, 64, false, false },
        { 4096, 16, true, false },
    };

    private static ImageFormat Fmt(int cs, int bits, bool v2, bool lazy, bool prealloc = false) => new(cs, bits, v2, lazy, prealloc);

    /// <summary>Spread the APIs and cache modes over the matrix so every format meets one of each over the three tests.</summary>
    private static (Api Api, QcowCacheMode Cache) Variant(ImageFormat f, int salt)
    {
        var h = (f.ClusterSize / 512 % 7) + f.RefcountBits + (f.V2 ? 1 : 0) + (f.Lazy ? 2 : 0) + salt;
        return ((Api)(h % 3), h % 2 == 0 ? QcowCacheMode.Writeback : QcowCacheMode.None);
    }

    // ------------------------------------------------------------------ (a)

    [Theory]
    [MemberData(nameof(Formats))]
    public void QemuWrittenImageReadsIdentically(int cs, int bits, bool v2, bool lazy)
        => QemuWrittenReadsIdentically(Fmt(cs, bits, v2, lazy));

    [Theory]
    [MemberData(nameof(PreallocFormats))]
    public void QemuWrittenPreallocatedImageReadsIdentically(int cs, int bits, bool v2, bool lazy)
        => QemuWrittenReadsIdentically(Fmt(cs, bits, v2, lazy, prealloc: true));

    private static void QemuWrittenReadsIdentically(ImageFormat f)
    {
        using var dir = new TempDir();
        var path = dir.File("qemu.qcow2");
        var size = Scenarios.DiskSize(f.ClusterSize);
        var ops = Scenarios.Standard(size, f.ClusterSize, seed: f.ClusterSize + f.RefcountBits);
        ops.Insert(10, new ReopenOp());
        QemuTools.Create(path, size, f);
        QemuTools.Apply(path, ops, dir);
        var raw = QemuTools.ReadRaw(path, dir);

        var model = new ContentModel(size, f.ClusterSize);
        model.ApplyAll(ops);
        QemuTools.AssertBytesEqual(model.Bytes, raw, "qemu-img convert vs the expected content (test self-check)");

        // Every API, both cache modes, read-only: all must see exactly what qemu-img convert sees.
        foreach (var api in new[] { Api.Sync, Api.Async, Api.Stream })
        {
            foreach (var cache in new[] { QcowCacheMode.Writeback, QcowCacheMode.None })
            {
                using var img = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true, CacheMode = cache });
                using var runner = new OurRunner(img, () => throw new InvalidOperationException(), api);
                img.Size.Should().Be(raw.LongLength);
                img.ClusterSize.Should().Be(f.ClusterSize);
                img.RefcountBits.Should().Be(f.RefcountBits);
                img.Version.Should().Be(f.V2 ? 2 : 3);
                QemuTools.AssertBytesEqual(raw, runner.ReadAll(), $"our {api} read (cache {cache}) vs qemu-img convert");
            }
        }
        // Reading must not have changed the file.
        QemuTools.AssertClean(path);
    }

    // ------------------------------------------------------------------ (b)

    [Theory]
    [MemberData(nameof(Formats))]
    public void SameOperationsGiveSameContentAndCleanImage(int cs, int bits, bool v2, bool lazy)
        => SameOperations(Fmt(cs, bits, v2, lazy), salt: 0);

    [Theory]
    [MemberData(nameof(PreallocFormats))]
    public void SameOperationsOnPreallocatedImages(int cs, int bits, bool v2, bool lazy)
        => SameOperations(Fmt(cs, bits, v2, lazy, prealloc: true), salt: 1);

    [Theory]
    [InlineData(Api.Sync, QcowCacheMode.None)]
    [InlineData(Api.Async, QcowCacheMode.Writeback)]
    [InlineData(Api.Async, QcowCacheMode.None)]
    [InlineData(Api.Stream, QcowCacheMode.Writeback)]
    [InlineData(Api.Stream, QcowCacheMode.None)]
    public void SameOperationsThroughEachApiAndCacheMode(Api api, QcowCacheMode cache)
    {
        SameOperations(Fmt(4096, 16, v2: false, lazy: false), salt: 0, (api, cache));
        SameOperations(Fmt(512, 16, v2: true, lazy: false), salt: 0, (api, cache));
    }

    private static void SameOperations(ImageFormat f, int salt, (Api Api, QcowCacheMode Cache)? variant = null)
    {
        var (api, cache) = variant ?? Variant(f, salt);
        using var dir = new TempDir();
        var ours = dir.File("ours.qcow2");
        var theirs = dir.File("qemu.qcow2");
        var size = Scenarios.DiskSize(f.ClusterSize);
        var ops = Scenarios.Standard(size, f.ClusterSize, seed: 7 * f.ClusterSize + f.RefcountBits);
        ops.Insert(12, new ReopenOp());

        QemuTools.Create(theirs, size, f);
        QemuTools.Apply(theirs, ops, dir);

        var model = new ContentModel(size, f.ClusterSize);
        model.ApplyAll(ops);
        using (var runner = new OurRunner(QcowImage.Create(ours, size, f.Ours(cache)), () => QcowImage.Open(ours, new QcowOpenOptions { CacheMode = cache }), api))
        {
            runner.ApplyAll(ops);
            QemuTools.AssertBytesEqual(model.Bytes, runner.ReadAll(), $"our {api} read-back before close");
        }

        QemuTools.AssertClean(ours);
        QemuTools.AssertSameContent(ours, theirs);
        QemuTools.AssertBytesEqual(model.Bytes, QemuTools.ReadRaw(ours, dir), "qemu-img convert of our image");
        AssertHeaderLike(ours, theirs, f);
    }

    /// <summary>The header fields that describe the format must be what QEMU writes for the same options.</summary>
    private static void AssertHeaderLike(string ours, string theirs, ImageFormat f)
    {
        using var a = QcowImage.Open(ours, new QcowOpenOptions { ReadOnly = true });
        using var b = QcowImage.Open(theirs, new QcowOpenOptions { ReadOnly = true });
        var ia = a.GetInfo();
        var ib = b.GetInfo();
        ia.Version.Should().Be(ib.Version);
        ia.ClusterSize.Should().Be(ib.ClusterSize);
        ia.RefcountBits.Should().Be(ib.RefcountBits);
        ia.LazyRefcounts.Should().Be(f.Lazy).And.Be(ib.LazyRefcounts);
        ia.VirtualSize.Should().Be(ib.VirtualSize);
        ia.Dirty.Should().BeFalse("a cleanly closed image is not dirty");
        ib.Dirty.Should().BeFalse();
    }

    // ------------------------------------------------------------------ (c)

    [Theory]
    [MemberData(nameof(Formats))]
    public void QemuWrittenImageThenWrittenByUsStaysCleanAndEqual(int cs, int bits, bool v2, bool lazy)
        => QemuThenUs(Fmt(cs, bits, v2, lazy), salt: 2);

    [Theory]
    [MemberData(nameof(PreallocFormats))]
    public void QemuPreallocatedImageThenWrittenByUs(int cs, int bits, bool v2, bool lazy)
        => QemuThenUs(Fmt(cs, bits, v2, lazy, prealloc: true), salt: 3);

    /// <summary>(c) through every API with O_DIRECT, on the smallest and largest clusters (file lengths not multiples of 4 KiB, huge padding).</summary>
    [Theory]
    [InlineData(512, Api.Sync)]
    [InlineData(512, Api.Async)]
    [InlineData(512, Api.Stream)]
    [InlineData(2 << 20, Api.Async)]
    public void QemuWrittenImageThenWrittenByUsWithCacheNone(int cs, Api api)
        => QemuThenUs(Fmt(cs, 16, v2: false, lazy: false), salt: 0, (api, QcowCacheMode.None));

    /// <summary>A disk of 4 TiB: a large L1 table, writes near its end and across the L1 entries, as QEMU writes them.</summary>
    [Theory]
    [InlineData(65536)]
    [InlineData(4096)]
    public void HugeSparseDiskMatchesQemu(int cs)
    {
        using var dir = new TempDir();
        var ours = dir.File("ours.qcow2");
        var theirs = dir.File("qemu.qcow2");
        var f = Fmt(cs, 16, v2: false, lazy: false);
        const long size = 4L << 40;
        var rng = new Random(cs);
        var l2Span = (long)cs * (cs / 8);
        var ops = new List<Op>
        {
            new WriteOp(size - 100, Scenarios.Random(rng, 100)),
            new WriteOp(l2Span - 50, Scenarios.Random(rng, 100)),
            new WriteOp(3 * l2Span + 12345, Scenarios.Random(rng, 3 * cs)),
            new WriteOp((1L << 40) + 7, Scenarios.Random(rng, 5000)),
            new ZeroOp(3 * l2Span, 2L * cs, Unmap: true),
            new DiscardOp(size - 4L * cs, 4L * cs),
            new WriteOp(size - (3L * cs) + 1, Scenarios.Random(rng, cs)),
            new ResizeOp(size + (1L << 40)),
            new WriteOp(size + (1L << 39), Scenarios.Random(rng, 777)),
        };
        QemuTools.Create(theirs, size, f);
        QemuTools.Apply(theirs, ops, dir);
        using (var runner = new OurRunner(QcowImage.Create(ours, size, f.Ours()), () => QcowImage.Open(ours), Api.Sync))
        {
            runner.ApplyAll(ops);
            var last = (WriteOp)ops[^1];
            var buf = new byte[last.Data.Length];
            runner.Image.Read(last.Offset, buf);
            buf.Should().Equal(last.Data);
        }
        QemuTools.AssertClean(ours);
        QemuTools.AssertSameContent(ours, theirs);
        new FileInfo(ours).Length.Should().BeLessThan(64L << 20, "a sparse disk stays small");
    }

    /// <summary>
    /// Layouts QEMU makes by other routes than create + write: full and falloc preallocation, qemu-img convert,
    /// and qemu-img amend rewriting the refcount structures (to 1-bit and back) and downgrading to compat=0.10.
    /// We read them as QEMU does, write them, and they stay clean and equal to what QEMU makes of the same writes.
    /// </summary>
    [Theory]
    [InlineData("prealloc-full")]
    [InlineData("prealloc-falloc")]
    [InlineData("converted")]
    [InlineData("amended-refcount-bits")]
    [InlineData("amended-to-v2")]
    public void OtherQemuLayoutsReadAndWriteLikeQemu(string how)
    {
        using var dir = new TempDir();
        var theirs = dir.File("qemu.qcow2");
        var ours = dir.File("ours.qcow2");
        const int cs = 4096;
        var size = Scenarios.DiskSize(cs);
        var first = Scenarios.Standard(size, cs, seed: 99);
        // No resize (and nothing past the original end): the disk keeps the size QEMU laid out.
        first.RemoveAll(o => o switch
        {
            ResizeOp => true,
            WriteOp w => w.Offset + w.Data.Length > size,
            ZeroOp z => z.Offset + z.Length > size,
            DiscardOp d => d.Offset + d.Length > size,
            _ => false,
        });
        switch (how)
        {
            case "prealloc-full":
            case "prealloc-falloc":
                QemuTools.Img("create", "-q", "-f", "qcow2", "-o", $"cluster_size={cs},preallocation={how[9..]}", theirs, size.ToString(System.Globalization.CultureInfo.InvariantCulture)).EnsureSuccess();
                QemuTools.Apply(theirs, first, dir);
                break;
            case "converted":
                var raw = dir.File("src.raw");
                var model0 = new ContentModel(size, cs);
                model0.ApplyAll(first);
                File.WriteAllBytes(raw, model0.Bytes);
                QemuTools.Img("convert", "-q", "-f", "raw", "-O", "qcow2", "-o", $"cluster_size={cs}", raw, theirs).EnsureSuccess();
                break;
            default:
                QemuTools.Create(theirs, size, new ImageFormat(cs, 16, V2: false, Lazy: false));
                QemuTools.Apply(theirs, first, dir);
                QemuTools.Img("amend", "-f", "qcow2", "-o", "refcount_bits=1", theirs).EnsureSuccess();
                QemuTools.Img("amend", "-f", "qcow2", "-o", how == "amended-to-v2" ? "compat=0.10,refcount_bits=16" : "refcount_bits=64", theirs).EnsureSuccess();
                break;
        }
        QemuTools.AssertClean(theirs);
        var model = new ContentModel(size, cs);
        model.ApplyAll(first);
        using (var ro = QcowImage.Open(theirs, new QcowOpenOptions { ReadOnly = true }))
        {
            var buf = new byte[ro.Size];
            ro.Read(0, buf);
            QemuTools.AssertBytesEqual(model.Bytes, buf, $"{how}: our read of QEMU's image");
        }

        File.Copy(theirs, ours);
        var second = Scenarios.Followup(size, cs, seed: 7);
        using (var runner = OurRunner.OpenFile(ours, Api.Sync))
        {
            runner.ApplyAll(second);
        }
        QemuTools.Apply(theirs, second, dir);
        model.ApplyAll(second);
        QemuTools.AssertClean(ours);
        QemuTools.AssertSameContent(ours, theirs);
        QemuTools.AssertBytesEqual(model.Bytes, QemuTools.ReadRaw(ours, dir), $"{how}: content after our writes");
    }

    private static void QemuThenUs(ImageFormat f, int salt, (Api Api, QcowCacheMode Cache)? variant = null)
    {
        var (api, cache) = variant ?? Variant(f, salt);
        using var dir = new TempDir();
        var ours = dir.File("ours.qcow2");
        var theirs = dir.File("qemu.qcow2");
        var size = Scenarios.DiskSize(f.ClusterSize);
        var first = Scenarios.Standard(size, f.ClusterSize, seed: 11 * f.ClusterSize + f.RefcountBits);
        var grown = first.OfType<ResizeOp>().Last().NewSize;
        var second = Scenarios.Followup(grown, f.ClusterSize, seed: 13 * f.ClusterSize + f.RefcountBits);
        second.Insert(4, new ReopenOp());

        QemuTools.Create(theirs, size, f);
        QemuTools.Apply(theirs, first, dir);
        File.Copy(theirs, ours);
        QemuTools.Apply(theirs, second, dir);

        var model = new ContentModel(size, f.ClusterSize);
        model.ApplyAll(first);
        model.ApplyAll(second);
        using (var runner = OurRunner.OpenFile(ours, api, cache))
        {
            runner.ApplyAll(second);
            QemuTools.AssertBytesEqual(model.Bytes, runner.ReadAll(), $"our {api} read-back");
        }

        QemuTools.AssertClean(ours);
        QemuTools.AssertSameContent(ours, theirs);
        QemuTools.AssertBytesEqual(model.Bytes, QemuTools.ReadRaw(ours, dir), "qemu-img convert of our image");
        // And QEMU can keep writing what we wrote.
        var third = Scenarios.Followup(model.Size, f.ClusterSize, seed: 17);
        QemuTools.Apply(ours, third, dir);
        model.ApplyAll(third);
        QemuTools.AssertClean(ours);
        QemuTools.AssertBytesEqual(model.Bytes, QemuTools.ReadRaw(ours, dir), "qemu-img convert after QEMU wrote over our writes");
    }
}
