using QcowTier.Tests.Infrastructure;
using static QcowTier.Tests.Backing.BackingKit;

namespace QcowTier.Tests.Backing;

/// <summary>Writes over a backing file: copy-on-write, zeroes and discards, compared with qemu-io doing the same on a copy.</summary>
public sealed class BackingWriteTests
{
    private sealed record Op(string Qemu, Action<QcowImage> Ours);

    private static Op W(long off, int len, byte p) => new($"write -P 0x{p:x} {off} {len}", i => i.Write(off, Fill(len, p)));

    private static Op Z(long off, long len, bool unmap = false) => new($"write -z {(unmap ? "-u " : "")}{off} {len}", i => i.WriteZeroes(off, len, unmap));

    private static Op D(long off, long len) => new($"discard {off} {len}", i => i.Discard(off, len));

    private static byte[] Fill(int len, byte p) => Enumerable.Repeat(p, len).ToArray();

    private static readonly Op[] Ops =
    [
        W(512, 1000, 0x51),               // inside one unallocated 4k cluster: head and tail from the backing chain
        W(8192 + 100, 3 * 4096, 0x52),    // several clusters, partial at both ends
        W(600 * 1024 + 100, 200, 0x53),   // over a zero cluster of the top: the rest stays zero
        W(1000 * 1024 + 1, 9000, 0x54),   // over the mid image's data
        W(2040 * 1024, 20 * 1024, 0x55),  // across the end of the raw base
        W(3100 * 1024 + 7, 4000, 0x56),   // beyond every backing file
        Z(40 * 1024, 8 * 1024),           // whole clusters: zero flag hides the backing data
        Z(52 * 1024 + 100, 300),          // partial: written zeroes, the rest copied
        Z(120 * 1024, 16 * 1024, unmap: true),
        D(200 * 1024, 64 * 1024),          // discard must not expose backing data (v3: zero clusters)
        D(1990 * 1024, 8 * 1024),          // discard of clusters the top allocated
        W(70 * 1024 + 2048, 100, 0x57),    // in place into an allocated cluster
    ];

    [Theory]
    [InlineData("1.1")]
    [InlineData("0.10")]
    public async Task OperationsMatchQemuIo(string compat)
    {
        using var dir = new TempDir();
        var top = ThreeLayers(dir, "4M", compat);
        var theirs = dir.File("theirs.qcow2");
        File.Copy(top, theirs);
        using (var image = QcowImage.Open(top))
        {
            foreach (var op in Ops)
            {
                op.Ours(image);
            }
            await image.WriteAsync(3500 * 1024 + 3, Fill(5000, 0x58));
        }
        Io("qcow2", theirs, [.. Ops.Select(o => o.Qemu), $"write -P 0x58 {3500 * 1024 + 3} 5000"]);
        Qemu.AssertClean(top);
        ShouldEqual(OurContent(top), QemuContent(dir, theirs));
        ShouldEqual(QemuContent(dir, top), QemuContent(dir, theirs));
    }

    [Theory]
    [InlineData(1, "1.1")]
    [InlineData(2, "1.1")]
    [InlineData(3, "0.10")]
    public void RandomOperationsMatchQemuIo(int seed, string compat)
    {
        using var dir = new TempDir();
        var top = ThreeLayers(dir, "4M", compat);
        var theirs = dir.File("theirs.qcow2");
        File.Copy(top, theirs);
        var rng = new Random(seed);
        var ops = new List<Op>();
        for (var i = 0; i < 40; i++)
        {
            // Sector-aligned (qemu-io's discard and write -z want it), anywhere in the 4 MiB disk, up to 3 clusters of the mid image.
            var off = rng.NextInt64(0, 8192) * 512;
            var len = (int)Math.Min(rng.Next(1, 400) * 512, (4L << 20) - off);
            ops.Add(rng.Next(10) switch
            {
                < 6 => W(off, len, (byte)rng.Next(1, 256)),
                < 8 => Z(off, len, unmap: rng.Next(2) == 0),
                _ => D(off, len),
            });
        }
        using (var image = QcowImage.Open(top))
        {
            foreach (var op in ops)
            {
                op.Ours(image);
            }
        }
        Io("qcow2", theirs, [.. ops.Select(o => o.Qemu)]);
        Qemu.AssertClean(top);
        ShouldEqual(OurContent(top), QemuContent(dir, theirs), $"(seed {seed}: {string.Join("; ", ops.Select(o => o.Qemu))})");
    }

    [Fact]
    public void CreatedOverlayPassesQemuCheckAndCompare()
    {
        using var dir = new TempDir();
        var top = ThreeLayers(dir);
        var ours = dir.File("ours.qcow2");
        using (var image = QcowImage.Create(ours, 5L << 20, new QcowCreateOptions { BackingFile = "top.qcow2", BackingFormat = "qcow2", ClusterSize = 16384 }))
        {
            image.BackingFile.Should().Be("top.qcow2");
            image.FullBackingFileName.Should().Be(dir.File("top.qcow2"));
            image.Write(5000, Fill(10000, 0x61));
            image.WriteZeroes(64 * 1024, 32 * 1024);
        }
        Qemu.AssertClean(ours);
        var info = Qemu.Img("info", ours).EnsureSuccess().StdOut;
        info.Should().Contain("backing file: top.qcow2").And.Contain("backing file format: qcow2");
        var theirs = dir.File("theirs.qcow2");
        Img("create", "-q", "-f", "qcow2", "-o", "cluster_size=16384", "-b", "top.qcow2", "-F", "qcow2", theirs, "5M");
        Io("qcow2", theirs, "write -P 0x61 5000 10000", "write -z 64k 32k");
        Qemu.AssertSameContent(ours, theirs);
        ShouldEqual(OurContent(ours), QemuContent(dir, theirs));
    }

    [Fact]
    public void CreatedOverRawWithoutFormatProbes()
    {
        using var dir = new TempDir();
        var b = dir.File("base.img");
        File.WriteAllBytes(b, Fill(100_000, 0x71)); // not a whole number of sectors: QEMU rounds the size up
        var ours = dir.File("ours.qcow2");
        using (var image = QcowImage.Create(ours, 1L << 20, new QcowCreateOptions { BackingFile = b, Compat = QcowCompat.V2 }))
        {
            image.BackingFormat.Should().BeNull();
            image.GetBackingChain().Single().Should().Be(new QcowBackingLayer(1, b, "raw", 100_352));
            image.Write(99_000, Fill(100, 0x72));
        }
        Qemu.AssertClean(ours);
        var expected = new byte[1 << 20];
        Fill(100_000, 0x71).CopyTo(expected, 0);
        Fill(100, 0x72).CopyTo(expected, 99_000);
        ShouldEqual(OurContent(ours), expected);
        ShouldEqual(QemuContent(dir, ours), expected);
    }

    [Fact]
    public async Task ConcurrentPartialWritesIntoTheSameClustersKeepEveryByte()
    {
        using var dir = new TempDir();
        var b = dir.File("base.raw");
        var expected = new byte[1 << 20];
        new Random(5).NextBytes(expected);
        File.WriteAllBytes(b, expected);
        var top = dir.File("top.qcow2");
        using (var image = QcowImage.Create(top, 1 << 20, new QcowCreateOptions { ClusterSize = 65536, BackingFile = "base.raw", BackingFormat = "raw" }))
        {
            // 16 writers, each owning every 16th 512-byte sector (but every 5th sector stays the backing file's): all race to allocate the same clusters.
            await Task.WhenAll(Enumerable.Range(0, 16).Select(w => Task.Run(async () =>
            {
                for (var sector = w; sector < 2048; sector += 16)
                {
                    if (sector % 5 == 0)
                    {
                        continue; // left to the backing file: copy-on-write must keep these
                    }
                    var data = Fill(512, (byte)(w + 1));
                    if (sector % 3 == 0)
                    {
                        await image.WriteAsync(sector * 512L, data);
                    }
                    else
                    {
                        image.Write(sector * 512L, data);
                    }
                }
            })));
            for (var sector = 0; sector < 2048; sector++)
            {
                if (sector % 5 != 0)
                {
                    expected.AsSpan(sector * 512, 512).Fill((byte)(sector % 16 + 1));
                }
            }
        }
        Qemu.AssertClean(top);
        ShouldEqual(OurContent(top), expected);
        ShouldEqual(QemuContent(dir, top), expected);
    }
}
