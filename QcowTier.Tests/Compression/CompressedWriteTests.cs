using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Interop.Support;
using static QcowTier.Tests.Compression.CompressionKit;

namespace QcowTier.Tests.Compression;

/// <summary>Writes, discards and zeroes over compressed clusters (QEMU's or ours): copy-on-write, exact refcounts, clean for qemu-img.</summary>
public sealed class CompressedWriteTests
{
    private const int Cs = 65536;

    public static TheoryData<string, bool> Sources() => new()
    {
        { "zlib", true },
        { "zstd", true },
        { "zlib", false },
        { "zstd", false },
    };

    /// <summary>A compressed image with 48 clusters of mixed content, made by QEMU or by us.</summary>
    private static (string Path, byte[] Content) Make(TempDir dir, string type, bool byQemu, int clusterSize = Cs)
    {
        var content = MixedContent(48L * clusterSize, clusterSize, seed: type.Length + (byQemu ? 1 : 2));
        if (byQemu)
        {
            return (QemuCompressed(dir, content, clusterSize, type), content);
        }
        var path = dir.File("ours-c.qcow2");
        using var img = QcowImage.Create(path, content.Length, new QcowCreateOptions { ClusterSize = clusterSize, CompressionType = TypeOf(type) });
        img.WriteCompressed(0, content);
        return (path, content);
    }

    private static void Judge(TempDir dir, string path, byte[] model)
    {
        QemuTools.AssertClean(path);
        Qemu.AssertSameContent(path, WriteRaw(dir, model), "qcow2", "raw");
        using var ro = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true });
        var back = new byte[model.Length];
        ro.Read(0, back);
        QemuTools.AssertBytesEqual(model, back, "our read back");
        var check = ro.Check();
        check.Corruptions.Should().Be(0);
        check.Leaks.Should().Be(0);
    }

    [Theory]
    [MemberData(nameof(Sources))]
    public async Task PartialOverwritesCopyOnWrite(string type, bool byQemu)
    {
        using var dir = new TempDir();
        var (path, model) = Make(dir, type, byQemu);
        var rng = new Random(5);
        using (var img = QcowImage.Open(path))
        {
            void Put(long off, int len, bool async)
            {
                var data = new byte[len];
                rng.NextBytes(data);
                if (async)
                {
                    img.WriteAsync(off, data).AsTask().GetAwaiter().GetResult();
                }
                else
                {
                    img.Write(off, data);
                }
                data.CopyTo(model.AsSpan((int)off));
            }
            Put(0, 1, false);                          // first byte of a compressed cluster
            Put(5L * Cs + Cs - 7, 7, true);            // last bytes
            Put(10L * Cs + 1000, 3000, false);         // the middle
            Put(11L * Cs + Cs - 100, Cs + 200, true);  // across two compressed clusters, touching a third
            Put(17L * Cs, Cs, false);                  // a whole cluster: no decompression needed
            Put(23L * Cs, 2 * Cs, true);               // whole clusters, async
            img.GetMap(0, Cs).Single().Kind.Should().Be(QcowExtentKind.Data);
            img.GetMap(30L * Cs, Cs).Single().Kind.Should().Be(QcowExtentKind.Compressed, "untouched clusters stay compressed");
            // Write, read back while other clusters stay compressed.
            var buf = new byte[Cs + 200];
            await img.ReadAsync(11L * Cs + Cs - 100, buf);
            QemuTools.AssertBytesEqual(model.AsSpan((int)(11L * Cs + Cs - 100), buf.Length), buf, "read after COW");
        }
        Judge(dir, path, model);
    }

    [Theory]
    [MemberData(nameof(Sources))]
    public void DiscardAndZeroDropCompressedReferences(string type, bool byQemu)
    {
        using var dir = new TempDir();
        var (path, model) = Make(dir, type, byQemu);
        using (var img = QcowImage.Open(path))
        {
            img.Discard(0, 6L * Cs);
            model.AsSpan(0, 6 * Cs).Clear();
            img.WriteZeroes(12L * Cs, 3L * Cs);
            model.AsSpan(12 * Cs, 3 * Cs).Clear();
            img.WriteZeroes(18L * Cs, 2L * Cs, mayUnmap: true);
            model.AsSpan(18 * Cs, 2 * Cs).Clear();
            img.WriteZeroes(24L * Cs + 100, 500); // partial: copy-on-write of zeroes
            model.AsSpan(24 * Cs + 100, 500).Clear();
            img.GetMap(12L * Cs, 3L * Cs).Should().OnlyContain(e => e.Kind == QcowExtentKind.Zero);
        }
        Judge(dir, path, model);
    }

    [Fact]
    public void DiscardingEveryClusterOfAPackedHostClusterFreesIt()
    {
        using var dir = new TempDir();
        var path = dir.File("free.qcow2");
        var content = new byte[32 * Cs];
        for (var c = 0; c < 32; c++)
        {
            content.AsSpan(c * Cs, Cs).Fill((byte)(c + 1));
        }
        using (var img = QcowImage.Create(path, content.Length))
        {
            img.WriteCompressed(0, content);
            img.Flush();
            img.Discard(0, 31L * Cs);
            img.Check().Leaks.Should().Be(0);
            // The host cluster still holds cluster 31: new compressed data may not be packed into freed space only.
            img.WriteCompressed(0, content.AsSpan(0, 4 * Cs));
            img.Discard(31L * Cs, Cs);
            img.Flush();
            img.WriteCompressed(31L * Cs, content.AsSpan(31 * Cs, Cs));
        }
        content.AsSpan(4 * Cs, 27 * Cs).Clear();
        Judge(dir, path, content);
    }

    [Theory]
    [InlineData("zlib")]
    [InlineData("zstd")]
    public void CompressedOverwritesReplaceAnyKindOfCluster(string type)
    {
        using var dir = new TempDir();
        var (path, model) = Make(dir, type, byQemu: true);
        var fresh = MixedContent(8L * Cs, Cs, 99);
        using (var img = QcowImage.Open(path))
        {
            img.Write(40L * Cs, new byte[] { 1, 2, 3 });            // compressed → normal
            img.WriteZeroes(44L * Cs, Cs);                           // compressed → zero
            img.WriteCompressed(40L * Cs, fresh);                    // normal, compressed, zero, random → compressed
            fresh.CopyTo(model, 40 * Cs);
            img.WriteCompressed(0, fresh);                           // compressed over compressed
            fresh.CopyTo(model, 0);
        }
        Judge(dir, path, model);
    }

    [Fact]
    public void QemuAppendsToAnImageWeCompressed()
    {
        using var dir = new TempDir();
        var (path, model) = Make(dir, "zlib", byQemu: false);
        // QEMU refuses compressed writes over allocated clusters: discard first, then qemu-io write -c.
        using (var img = QcowImage.Open(path))
        {
            img.Discard(2L * Cs, 2L * Cs);
        }
        QemuTools.Io("-f", "qcow2", "-c", $"write -c -q -P 0x3c {2L * Cs} {2L * Cs}", path).EnsureSuccess();
        model.AsSpan(2 * Cs, 2 * Cs).Fill(0x3c);
        QemuTools.Io("-f", "qcow2", "-c", $"write -q -P 0x3d {7L * Cs + 10} 100", path).EnsureSuccess();
        model.AsSpan(7 * Cs + 10, 100).Fill(0x3d);
        Judge(dir, path, model);
        using (var img = QcowImage.Open(path))
        {
            img.WriteCompressed(9L * Cs, model.AsSpan(2 * Cs, Cs));
            model.AsSpan(2 * Cs, Cs).CopyTo(model.AsSpan(9 * Cs));
        }
        Judge(dir, path, model);
    }

    [Fact]
    public void LazyRefcountImagesStayConsistent()
    {
        using var dir = new TempDir();
        var path = dir.File("lazy.qcow2");
        var content = MixedContent(16L * Cs, Cs, 8);
        using (var img = QcowImage.Create(path, content.Length, new QcowCreateOptions { LazyRefcounts = true }))
        {
            img.WriteCompressed(0, content);
            img.Write(3L * Cs + 5, new byte[] { 7 });
            content[3 * Cs + 5] = 7;
        }
        Judge(dir, path, content);
    }
}
