using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Interop.Support;
using static QcowTier.Tests.Compression.CompressionKit;

namespace QcowTier.Tests.Compression;

/// <summary>Compressed clusters both ways: images qemu-img compressed read identically here, and images we compress are clean and equal for QEMU.</summary>
public sealed class CompressionInteropTests
{
    private static readonly QcowOpenOptions ReadOnly = new() { ReadOnly = true };

    public static TheoryData<int, string> Formats() => new()
    {
        { 4096, "zlib" },
        { 4096, "zstd" },
        { 65536, "zlib" },
        { 65536, "zstd" },
        { 2 << 20, "zlib" },
        { 2 << 20, "zstd" },
        { 512, "zlib" },
    };

    private static long SizeFor(int clusterSize) => clusterSize >= (2 << 20) ? 12L << 20 : clusterSize == 512 ? 256L << 10 : (3L << 20) - 4096;

    [Theory]
    [MemberData(nameof(Formats))]
    public async Task QemuCompressedImageReadsIdentically(int clusterSize, string type)
    {
        using var dir = new TempDir();
        var size = SizeFor(clusterSize);
        var content = MixedContent(size, clusterSize, seed: clusterSize + type.Length);
        var path = QemuCompressed(dir, content, clusterSize, type);
        using var img = QcowImage.Open(path, ReadOnly);
        img.GetInfo().CompressionType.Should().Be(type);
        img.GetMap().Should().Contain(e => e.Kind == QcowExtentKind.Compressed);

        var whole = new byte[size];
        img.Read(0, whole);
        QemuTools.AssertBytesEqual(content, whole, "whole-disk synchronous read");

        // Unaligned pieces that start and end inside compressed clusters, asynchronously.
        var rng = new Random(7);
        for (var i = 0; i < 40; i++)
        {
            var off = rng.NextInt64(0, size - 1);
            var len = (int)Math.Min(size - off, rng.Next(1, 3 * clusterSize));
            var buf = new byte[len];
            await img.ReadAsync(off, buf);
            QemuTools.AssertBytesEqual(content.AsSpan((int)off, len), buf, $"async read at {off}+{len}");
        }

        var check = img.Check();
        check.Corruptions.Should().Be(0);
        check.Leaks.Should().Be(0);
        check.CompressedClusters.Should().Be(QemuCompressedClusters(path)).And.BeGreaterThan(0);
    }

    [Theory]
    [MemberData(nameof(Formats))]
    public void WeCompressQemuReads(int clusterSize, string type)
    {
        using var dir = new TempDir();
        var size = SizeFor(clusterSize);
        var content = MixedContent(size, clusterSize, seed: 3 * clusterSize + type.Length);
        var path = dir.File("ours.qcow2");
        using (var img = QcowImage.Create(path, size, new QcowCreateOptions { ClusterSize = clusterSize, CompressionType = TypeOf(type) }))
        {
            img.WriteCompressed(0, content);
            img.GetMap().Should().Contain(e => e.Kind == QcowExtentKind.Compressed);
            img.GetMap().Should().Contain(e => e.Kind == QcowExtentKind.Data, "random clusters do not shrink and are stored uncompressed");
        }
        QemuTools.AssertClean(path);
        QemuCompressedClusters(path).Should().BeGreaterThan(0);
        Qemu.AssertSameContent(path, WriteRaw(dir, content), "qcow2", "raw");
        QemuTools.Img("info", path).EnsureSuccess().StdOut.Should().Contain("compression type: " + type);
        // qemu-io reads a compressed cluster with a pattern check (cluster 4 of each 6 is filled with c + 1).
        var c4 = Math.Min(4, (int)(size / clusterSize) - 1);
        if (c4 == 4)
        {
            QemuTools.Io("-f", "qcow2", "-c", $"read -q -P {5} {4L * clusterSize} {clusterSize}", path).EnsureSuccess().StdOut.Should().BeEmpty();
        }
        using var ro = QcowImage.Open(path, ReadOnly);
        var back = new byte[size];
        ro.Read(0, back);
        QemuTools.AssertBytesEqual(content, back, "read back");
    }

    [Fact]
    public void CompressedClustersArePackedSeveralPerHostCluster()
    {
        using var dir = new TempDir();
        var path = dir.File("packed.qcow2");
        const int cs = 65536;
        var content = new byte[64 * cs];
        for (var c = 0; c < 64; c++)
        {
            content.AsSpan(c * cs, cs).Fill((byte)(c + 1)); // each compresses to a few hundred bytes
        }
        using (var img = QcowImage.Create(path, content.Length))
        {
            img.WriteCompressed(0, content);
        }
        QemuTools.AssertClean(path);
        Qemu.AssertSameContent(path, WriteRaw(dir, content), "qcow2", "raw");
        // Header, refcount table and block, L1, L2, and the 64 compressed clusters in one host cluster.
        new FileInfo(path).Length.Should().BeLessThanOrEqualTo(6L * cs);
    }

    [Theory]
    [InlineData("zlib", 1)]
    [InlineData("zstd", 16)]
    [InlineData("zlib", 64)]
    public void PackingRunsAcrossHostClustersAndRespectsRefcountWidth(string type, int refcountBits)
    {
        using var dir = new TempDir();
        var path = dir.File("span.qcow2");
        const int cs = 4096;
        var rng = new Random(refcountBits);
        // Half-random clusters compress to about half a cluster: their data keeps running into the next host cluster.
        var content = new byte[200 * cs];
        for (var c = 0; c < 200; c++)
        {
            var span = content.AsSpan(c * cs, cs);
            rng.NextBytes(span[..(cs / 2)]);
            span[(cs / 2)..].Fill((byte)c);
        }
        using (var img = QcowImage.Create(path, content.Length, new QcowCreateOptions { ClusterSize = cs, RefcountBits = refcountBits, CompressionType = TypeOf(type) }))
        {
            for (var c = 0; c < 200; c += 8)
            {
                img.WriteCompressed(c * (long)cs, content.AsSpan(c * cs, 8 * cs));
            }
            img.Check().Corruptions.Should().Be(0);
        }
        QemuTools.AssertClean(path);
        Qemu.AssertSameContent(path, WriteRaw(dir, content), "qcow2", "raw");
        QemuCompressedClusters(path).Should().Be(200);
    }

    [Fact]
    public void Version2ImagesTakeCompressedClusters()
    {
        using var dir = new TempDir();
        var path = dir.File("v2.qcow2");
        var content = MixedContent(1 << 20, 65536, 11);
        using (var img = QcowImage.Create(path, content.Length, new QcowCreateOptions { Compat = QcowCompat.V2 }))
        {
            img.WriteCompressed(0, content);
            img.Discard(0, 65536);
        }
        content.AsSpan(0, 65536).Clear();
        QemuTools.AssertClean(path);
        Qemu.AssertSameContent(path, WriteRaw(dir, content), "qcow2", "raw");
    }

    [Fact]
    public void LastPartialClusterIsZeroPaddedAndOtherwiseWholeClustersAreRequired()
    {
        using var dir = new TempDir();
        var path = dir.File("tail.qcow2");
        const long size = 65536 * 3 + 1536;
        var content = MixedContent(size, 65536, 5);
        content.AsSpan(3 * 65536).Fill(0x61);
        using (var img = QcowImage.Create(path, size))
        {
            img.WriteCompressed(0, content);
            FluentActions.Invoking(() => img.WriteCompressed(512, new byte[65536])).Should().Throw<ArgumentException>();
            FluentActions.Invoking(() => img.WriteCompressed(0, new byte[4096])).Should().Throw<ArgumentException>();
            img.GetMap(3 * 65536).Single().Kind.Should().Be(QcowExtentKind.Compressed);
        }
        QemuTools.AssertClean(path);
        Qemu.AssertSameContent(path, WriteRaw(dir, content), "qcow2", "raw");
    }

    [Fact]
    public async Task AsyncCompressedWritesAndConcurrentReadersAgree()
    {
        using var dir = new TempDir();
        var path = dir.File("conc.qcow2");
        const int cs = 65536;
        var content = MixedContent(96L * cs, cs, 21);
        using (var img = QcowImage.Create(path, content.Length, new QcowCreateOptions { CompressionType = QcowCompressionType.Zstd }))
        {
            var writers = Enumerable.Range(0, 4).Select(w => Task.Run(async () =>
            {
                for (var c = w; c < 96; c += 4)
                {
                    if (c % 2 == 0)
                    {
                        await img.WriteCompressedAsync(c * (long)cs, content.AsMemory(c * cs, cs));
                    }
                    else
                    {
                        img.WriteCompressed(c * (long)cs, content.AsSpan(c * cs, cs));
                    }
                }
            })).ToArray();
            await Task.WhenAll(writers);
            var readers = Enumerable.Range(0, 4).Select(r => Task.Run(async () =>
            {
                var rng = new Random(r);
                var buf = new byte[3000];
                for (var i = 0; i < 200; i++)
                {
                    var off = rng.NextInt64(0, content.Length - buf.Length);
                    await img.ReadAsync(off, buf);
                    QemuTools.AssertBytesEqual(content.AsSpan((int)off, buf.Length), buf, $"concurrent read at {off}");
                }
            })).ToArray();
            await Task.WhenAll(readers);
        }
        QemuTools.AssertClean(path);
        Qemu.AssertSameContent(path, WriteRaw(dir, content), "qcow2", "raw");
    }

    /// <summary>
    /// Readers of compressed clusters racing flushes that free clusters: a flush holds the metadata lock
    /// while it waits for active reads, so a counted read must never wait for that lock.
    /// </summary>
    [Fact]
    public async Task CompressedReadsRacingFreeingFlushesDoNotDeadlock()
    {
        using var dir = new TempDir();
        const int cs = 65536;
        var content = MixedContent(32L * cs, cs, 31);
        using var img = QcowImage.Create(dir.File("race.qcow2"), content.Length);
        img.WriteCompressed(0, content);
        using var stop = new CancellationTokenSource(TimeSpan.FromSeconds(3));
        var readers = Enumerable.Range(0, 3).Select(r => Task.Run(() =>
        {
            var buf = new byte[4096];
            var rng = new Random(r);
            while (!stop.IsCancellationRequested)
            {
                img.Read(rng.Next(0, 16) * (long)cs + rng.Next(0, cs - 4096), buf);
            }
        })).ToArray();
        var writer = Task.Run(() =>
        {
            var rng = new Random(9);
            while (!stop.IsCancellationRequested)
            {
                var c = rng.Next(16, 32);
                img.Discard(c * (long)cs, cs);
                img.Flush();
                img.WriteCompressed(c * (long)cs, content.AsSpan(c * cs, cs));
                img.Flush();
            }
        });
        var all = Task.WhenAll([.. readers, writer]);
        (await Task.WhenAny(all, Task.Delay(TimeSpan.FromSeconds(60)))).Should().BeSameAs(all, "no deadlock");
        await all;
        var back = new byte[content.Length];
        img.Read(0, back);
        QemuTools.AssertBytesEqual(content, back, "after the race");
    }

    [Fact]
    public void ZstdHeaderAsQemuWritesIt()
    {
        using var dir = new TempDir();
        var ours = dir.File("ours.qcow2");
        var theirs = dir.File("theirs.qcow2");
        QcowImage.Create(ours, 1 << 20, new QcowCreateOptions { CompressionType = QcowCompressionType.Zstd }).Dispose();
        QemuTools.Img("create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", theirs, "1M").EnsureSuccess();
        var a = File.ReadAllBytes(ours).AsSpan(0, 112).ToArray();
        var b = File.ReadAllBytes(theirs).AsSpan(0, 112).ToArray();
        a.AsSpan(72, 8).ToArray().Should().Equal(b.AsSpan(72, 8).ToArray(), "incompatible bit 3 set as QEMU sets it");
        a[104].Should().Be(b[104]).And.Be(1);
        FluentActions.Invoking(() => QcowImage.Create(dir.File("v2z.qcow2"), 1 << 20, new QcowCreateOptions { Compat = QcowCompat.V2, CompressionType = QcowCompressionType.Zstd }))
            .Should().Throw<ArgumentException>();
    }
}
