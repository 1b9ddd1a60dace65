using System.Text.RegularExpressions;
using QcowTier.Tests.Cli;
using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Interop.Support;

namespace QcowTier.Tests.ExtendedL2;

/// <summary>Writes, zeroes and discards on extended L2 images, judged against qemu-io doing the same and by qemu-img.</summary>
public sealed class ExtendedL2WriteTests
{
    private static string StripOffsets(string mapJson) => Regex.Replace(mapJson, @", ""offset"": \d+", "");

    /// <summary>Odd subcluster ranges: partial subclusters, runs across clusters, rewrites of allocated and zeroed subclusters.</summary>
    private static string[] Commands(int cs)
    {
        var sc = cs / 32;
        return
        [
            $"write -P 1 {sc} {sc}",
            $"write -P 2 {3 * sc + 100} 700",
            $"write -P 3 {cs - 5} 10",
            $"write -P 4 {2L * cs} {cs}",
            $"write -z {2L * cs + 4 * sc} {3 * sc}",
            $"write -P 9 {2L * cs + 5 * sc + 7} 20",
            $"write -z {5L * cs} {cs}",
            $"write -P 5 {6L * cs + 7 * sc} {9 * sc}",
            $"write -P 6 {6L * cs + 8 * sc + 1} {sc}",
            $"write -z -u {6L * cs} {cs}",
            $"write -P 6 {8L * cs} {3L * cs}",
            $"discard {9L * cs} {cs}",
            $"write -P 8 {20L * cs + 31 * sc} {2 * sc}",
            $"write -z {21L * cs + 5 * sc} {sc}",
            $"write -P 10 {21L * cs + 5 * sc + 10} 10",
            $"write -z {8L * cs + 3 * sc + 5} {sc}",
            $"write -P 11 {30L * cs + 2 * sc} {sc}",
            $"write -P 12 {30L * cs} {cs}",
        ];
    }

    [Theory]
    [InlineData(16384)]
    [InlineData(65536)]
    [InlineData(2 << 20)]
    public void OurWritesMatchQemuIo(int cs)
    {
        using var dir = new TempDir();
        var ours = dir.File("ours.qcow2");
        var theirs = dir.File("theirs.qcow2");
        var size = (48L * cs).ToString(System.Globalization.CultureInfo.InvariantCulture);
        var opts = $"extended_l2=on,cluster_size={cs}";
        CliHarness.Run("create", "-q", "-f", "qcow2", "-o", opts, ours, size).ExitCode.Should().Be(0);
        QemuTools.Img("create", "-q", "-f", "qcow2", "-o", opts, theirs, size).EnsureSuccess();
        var args = new List<string> { "io", "-f", "qcow2" };
        foreach (var c in Commands(cs))
        {
            args.AddRange(["-c", c]);
        }
        var r = CliHarness.Run([.. args, ours]);
        r.ExitCode.Should().Be(0, r.StdOut + r.StdErr);
        CliHarness.QemuIo(theirs, "qcow2", Commands(cs));
        Qemu.AssertClean(ours);
        Qemu.AssertSameContent(ours, theirs);
        StripOffsets(QemuTools.Img("map", "--output=json", ours).StdOut)
            .Should().Be(StripOffsets(QemuTools.Img("map", "--output=json", theirs).StdOut), "the same subclusters are allocated, zero or unallocated");
        QemuTools.Img("info", ours).StdOut.Should().Contain("extended l2: true");
    }

    /// <summary>
    /// The same commands on overlays of one backing file: partly written subclusters copy the backing
    /// bytes around the write, untouched subclusters keep reading through (both judged against qemu-io).
    /// </summary>
    [Theory]
    [InlineData(16384)]
    [InlineData(65536)]
    public void OverABackingFileOurWritesMatchQemuIo(int cs)
    {
        using var dir = new TempDir();
        var basePath = dir.File("base.qcow2");
        var ours = dir.File("ours.qcow2");
        var theirs = dir.File("theirs.qcow2");
        var size = (48L * cs).ToString(System.Globalization.CultureInfo.InvariantCulture);
        QemuTools.Img("create", "-q", "-f", "qcow2", basePath, size).EnsureSuccess();
        QemuTools.Io("-f", "qcow2", "-c", $"write -P 0x7e 0 {size}", basePath).EnsureSuccess();
        var opts = $"extended_l2=on,cluster_size={cs}";
        foreach (var overlay in new[] { ours, theirs })
        {
            QemuTools.Img("create", "-q", "-f", "qcow2", "-o", opts, "-b", basePath, "-F", "qcow2", overlay).EnsureSuccess();
        }
        var args = new List<string> { "io", "-f", "qcow2" };
        foreach (var c in Commands(cs))
        {
            args.AddRange(["-c", c]);
        }
        var r = CliHarness.Run([.. args, ours]);
        r.ExitCode.Should().Be(0, r.StdOut + r.StdErr);
        CliHarness.QemuIo(theirs, "qcow2", Commands(cs));
        Qemu.AssertClean(ours);
        Qemu.AssertSameContent(ours, theirs);
        StripOffsets(QemuTools.Img("map", "--output=json", ours).StdOut)
            .Should().Be(StripOffsets(QemuTools.Img("map", "--output=json", theirs).StdOut), "the same subclusters are allocated, zero or read through");

        using var img = QcowImage.Open(ours, new QcowOpenOptions { ReadOnly = true });
        var buf = new byte[img.Size];
        img.Read(0, buf);
        QemuTools.AssertBytesEqual(QemuTools.ReadRaw(theirs, dir), buf, "our read of the overlay vs QEMU's");
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task LibraryOperationsAgainstAModel(bool lazyRefcounts)
    {
        using var dir = new TempDir();
        var path = dir.File("model.qcow2");
        const int cs = 65536;
        var model = new byte[40L * cs];
        var rng = new Random(42);
        using (var img = QcowImage.Create(path, model.Length, new QcowCreateOptions { ExtendedL2 = true, LazyRefcounts = lazyRefcounts }))
        {
            for (var i = 0; i < 300; i++)
            {
                var off = rng.NextInt64(0, model.Length - 1);
                var len = (int)Math.Min(model.Length - off, rng.Next(1, 3 * cs / 2));
                switch (rng.Next(10))
                {
                    case < 5:
                        var data = new byte[len];
                        rng.NextBytes(data);
                        if (rng.Next(2) == 0)
                        {
                            await img.WriteAsync(off, data);
                        }
                        else
                        {
                            img.Write(off, data);
                        }
                        data.CopyTo(model, off);
                        break;
                    case < 7:
                        img.WriteZeroes(off, len, mayUnmap: rng.Next(2) == 0);
                        model.AsSpan((int)off, len).Clear();
                        break;
                    case 7:
                        img.Discard(off, len);
                        var a = (off + cs - 1) / cs * cs;
                        var b = (off + len) / cs * cs;
                        if (b > a)
                        {
                            model.AsSpan((int)a, (int)(b - a)).Clear();
                        }
                        break;
                    case 8:
                        var c = rng.Next(40);
                        var chunk = new byte[cs];
                        chunk.AsSpan(0, cs / 2).Fill((byte)c);
                        img.WriteCompressed((long)c * cs, chunk);
                        chunk.CopyTo(model, c * cs);
                        break;
                    default:
                        var buf = new byte[len];
                        await img.ReadAsync(off, buf);
                        QemuTools.AssertBytesEqual(model.AsSpan((int)off, len), buf, $"op {i}: read at {off}+{len}");
                        break;
                }
            }
            var check = img.Check();
            check.Corruptions.Should().Be(0);
            check.Leaks.Should().Be(0);
        }
        Qemu.AssertClean(path);
        Qemu.AssertSameContent(path, Compression.CompressionKit.WriteRaw(dir, model), "qcow2", "raw");
    }

    [Fact]
    public void CreationRulesAndTieringRefusal()
    {
        using var dir = new TempDir();
        FluentActions.Invoking(() => QcowImage.Create(dir.File("a.qcow2"), 1 << 20, new QcowCreateOptions { ExtendedL2 = true, ClusterSize = 8192 }))
            .Should().Throw<ArgumentException>().WithMessage("*at least 16384*");
        FluentActions.Invoking(() => QcowImage.Create(dir.File("b.qcow2"), 1 << 20, new QcowCreateOptions { ExtendedL2 = true, Compat = QcowCompat.V2 }))
            .Should().Throw<ArgumentException>().WithMessage("*1.1*");
        CliHarness.Run("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=4k", dir.File("c.qcow2"), "1M")
            .ShouldBeOneLineError("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes");
        using var img = QcowImage.Create(dir.File("d.qcow2"), 1 << 20, new QcowCreateOptions { ExtendedL2 = true });
        FluentActions.Invoking(() => img.AttachTier(new QcowTierOptions { DataFile = "d.hdd" })).Should().Throw<QcowUnsupportedFeatureException>();
    }

    /// <summary>A dirty lazy-refcount image is repaired at a writable open, and leaks are repaired, with 128-bit entries.</summary>
    [Fact]
    public void DirtyRepairAndLeakRepairWalkExtendedEntries()
    {
        using var dir = new TempDir();
        var path = dir.File("lazy.qcow2");
        var copy = dir.File("dirty.qcow2");
        const int cs = 65536;
        var model = new byte[16 * cs];
        using (var img = QcowImage.Create(path, model.Length, new QcowCreateOptions { ExtendedL2 = true, LazyRefcounts = true }))
        {
            var data = new byte[5000];
            new Random(3).NextBytes(data);
            img.Write(3 * cs + 2048, data);
            data.CopyTo(model, 3 * cs + 2048);
            img.WriteCompressed(6L * cs, model.AsSpan(3 * cs, cs));
            model.AsSpan(3 * cs, cs).CopyTo(model.AsSpan(6 * cs));
            img.WriteZeroes(3L * cs + 4096, 2048);
            model.AsSpan(3 * cs + 4096, 2048).Clear();
            img.Flush();
            File.Copy(path, copy); // as left by a crash: dirty bit set, refcounts stale
        }
        QemuTools.Img("info", copy).StdOut.Should().Contain("lazy refcounts: true");
        using (var img = QcowImage.Open(copy))
        {
            var back = new byte[model.Length];
            img.Read(0, back);
            QemuTools.AssertBytesEqual(model, back, "after the dirty repair");
        }
        Qemu.AssertClean(copy);
        // Leak a cluster (refcount without reference) and let our check repair it.
        using (var img = QcowImage.Open(copy))
        {
            img.Core.Refcounts.Update(0, 1); // the header cluster: refcount 2, referenced once
            img.Flush();
        }
        QemuTools.Check(copy).Leaks.Should().Be(1);
        using (var img = QcowImage.Open(copy))
        {
            img.Check(QcowRepairMode.Leaks).LeaksFixed.Should().Be(1);
        }
        Qemu.AssertClean(copy);
        Qemu.AssertSameContent(copy, Compression.CompressionKit.WriteRaw(dir, model), "qcow2", "raw");
    }

    [Fact]
    public void QemuAndWeTakeTurnsOnOneImage()
    {
        using var dir = new TempDir();
        var path = dir.File("turns.qcow2");
        const int cs = 32768;
        var sc = cs / 32;
        QemuTools.Img("create", "-q", "-f", "qcow2", "-o", $"extended_l2=on,cluster_size={cs}", path, "4M").EnsureSuccess();
        CliHarness.QemuIo(path, "qcow2", $"write -P 1 {sc} {2 * sc}", $"write -z {cs} {cs}", $"write -P 2 {3 * cs + 5} 100");
        var model = QemuTools.ReadRaw(path, dir);
        using (var img = QcowImage.Open(path))
        {
            var data = new byte[3 * sc];
            data.AsSpan().Fill(7);
            img.Write(2 * sc + 10, data);                  // over allocated and unallocated subclusters
            data.CopyTo(model, 2 * sc + 10);
            img.Write(cs + 3 * sc, data.AsSpan(0, 10));    // into a zeroed cluster
            data.AsSpan(0, 10).CopyTo(model.AsSpan(cs + 3 * sc));
            img.WriteZeroes(3 * cs, 2 * sc);               // subclusters of an allocated cluster
            model.AsSpan(3 * cs, 2 * sc).Clear();
        }
        Qemu.AssertClean(path);
        QemuTools.AssertBytesEqual(model, QemuTools.ReadRaw(path, dir), "after our writes");
        CliHarness.QemuIo(path, "qcow2", $"write -P 3 {2 * sc} 50", $"write -z {sc} {sc}");
        model.AsSpan(2 * sc, 50).Fill(3);
        model.AsSpan(sc, sc).Clear();
        using (var img = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true }))
        {
            var back = new byte[model.Length];
            img.Read(0, back);
            QemuTools.AssertBytesEqual(model, back, "after QEMU's writes");
        }
    }
}
