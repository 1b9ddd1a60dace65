using System.IO.Compression;
using QcowTier.Format;
using QcowTier.Tests.Hostile.Support;
using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Interop.Support;
using static QcowTier.Tests.Compression.CompressionKit;

namespace QcowTier.Tests.Compression;

/// <summary>Damaged and hostile compressed cluster descriptors and streams: typed errors, bounded time and memory, never a crash or a wrong read.</summary>
public sealed class CompressedHostileTests
{
    private const int Cs = 65536;
    private const ulong CompressedFlag = 1UL << 62;
    private static readonly QcowOpenOptions ReadOnly = new() { ReadOnly = true };

    /// <summary>A QEMU-compressed image of 8 compressible clusters, loaded for patching.</summary>
    private static HostileImage Base(TempDir dir, string type = "zlib", int clusterSize = Cs)
    {
        var content = new byte[8 * clusterSize];
        for (var c = 0; c < 8; c++)
        {
            for (var i = 0; i < clusterSize; i++)
            {
                content[c * clusterSize + i] = (byte)(i % (c + 3));
            }
        }
        return HostileImage.Load(QemuCompressed(dir, content, clusterSize, type));
    }

    private static ulong Entry0(HostileImage img) => img.U64(img.L2Offset);

    private static ulong Descriptor(long offset, int length, int clusterBits)
        => CompressedFlag | CompressedDescriptor.Encode(offset, length, clusterBits);

    private static void ReadFails(string path, params string[] fragments)
    {
        using var img = QcowImage.Open(path, ReadOnly);
        Guard.Fails<QcowCorruptImageException>(() => img.Read(0, new byte[4096]), fragments);
        Guard.Fails<QcowCorruptImageException>(() => img.ReadAsync(100, new byte[Cs]).AsTask().GetAwaiter().GetResult(), fragments);
        // The other clusters still read.
        var buf = new byte[4096];
        img.Read(3L * img.ClusterSize, buf);
        buf[1].Should().Be(1);
    }

    [Fact]
    public void OffsetZeroOrInsideTheHeaderIsCorrupt()
    {
        using var dir = new TempDir();
        var img = Base(dir);
        img.SetU64(img.L2Offset, Descriptor(0, 500, 16));
        ReadFails(img.Save(), "compressed", "header");
        img.SetU64(img.L2Offset, Descriptor(4000, 500, 16));
        ReadFails(img.Save(), "compressed", "header");
    }

    [Fact]
    public void OffsetBeyondTheFileIsCorrupt()
    {
        using var dir = new TempDir();
        var img = Base(dir);
        img.SetU64(img.L2Offset, Descriptor(img.Bytes.Length + 3 * Cs + 17, 2000, 16));
        var e = Guard.Fails<QcowCorruptImageException>(() =>
        {
            using var ro = QcowImage.Open(img.Save(), ReadOnly);
            ro.Read(0, new byte[10]);
        }, "beyond the end of the file");
        e.Field.Should().Be("compressed cluster descriptor");
    }

    [Fact]
    public void DataCutShortByTheEndOfTheFileIsCorrupt()
    {
        using var dir = new TempDir();
        var img = Base(dir);
        // Point cluster 0 at the last compressed cluster's data and cut the file in its middle.
        var last = img.U64(img.L2Offset + 7 * 8);
        var d = CompressedDescriptor.Decode(last, 16);
        img.SetU64(img.L2Offset, last);
        img.Truncate(d.Offset + 8);
        ReadFails(img.Save(), "does not decompress");
    }

    [Theory]
    [InlineData("l1")]
    [InlineData("l2")]
    [InlineData("refcount-table")]
    [InlineData("refcount-block")]
    public void DataOverlappingMetadataIsCorrupt(string what)
    {
        using var dir = new TempDir();
        var img = Base(dir);
        var target = what switch
        {
            "l1" => img.L1Offset,
            "l2" => img.L2Offset,
            "refcount-table" => img.RefcountTable,
            _ => img.RefcountBlock,
        };
        img.SetU64(img.L2Offset, Descriptor(target + 24, 3000, 16));
        ReadFails(img.Save(), "overlaps metadata");
    }

    [Theory]
    [InlineData("zlib")]
    [InlineData("zstd")]
    public void GarbageStreamIsCorrupt(string type)
    {
        using var dir = new TempDir();
        var img = Base(dir, type);
        var d = CompressedDescriptor.Decode(Entry0(img), 16);
        // Only the start of cluster 0's stream: the clusters packed after it keep their bytes.
        new Random(1).NextBytes(img.Bytes.AsSpan((int)d.Offset, 32));
        img.Bytes[d.Offset] = 0xff; // deflate: a reserved block type; zstd: a bad magic number
        ReadFails(img.Save(), "does not decompress");
        var qemu = QemuTools.Io("-f", "qcow2", "-c", "read 0 4k", img.Path);
        (qemu.ExitCode != 0 || qemu.StdOut.Contains("error", StringComparison.OrdinalIgnoreCase)).Should().BeTrue("QEMU fails this read too: " + qemu.StdOut + qemu.StdErr);
    }

    [Fact]
    public void DeflateBombStopsAtOneCluster()
    {
        using var dir = new TempDir();
        var img = Base(dir);
        // 64 MiB of 0x5a deflates to ~64 KiB: QEMU inflates only until the cluster is full, and so do we.
        using var ms = new MemoryStream();
        using (var z = new DeflateStream(ms, CompressionLevel.SmallestSize, leaveOpen: true))
        {
            var chunk = new byte[1 << 20];
            chunk.AsSpan().Fill(0x5a);
            for (var i = 0; i < 64; i++)
            {
                z.Write(chunk);
            }
        }
        var bomb = ms.ToArray();
        bomb.Length.Should().BeLessThan(2 * Cs - 512);
        var at = (long)img.Bytes.Length;
        img.Truncate(at + bomb.Length);
        bomb.CopyTo(img.Bytes, at);
        img.SetU64(img.L2Offset, Descriptor(at, bomb.Length, 16));
        var path = img.Save();
        using (var ro = QcowImage.Open(path, ReadOnly))
        {
            var buf = new byte[Cs];
            Guard.Succeeds(() => ro.Read(0, buf));
            buf.Should().OnlyContain(b => b == 0x5a);
        }
        QemuTools.Io("-f", "qcow2", "-c", $"read -q -P 0x5a 0 {Cs}", path).EnsureSuccess().StdOut.Should().BeEmpty("QEMU reads the same cluster");
    }

    [Fact]
    public void ZstdBombAndHugeWindowAreRefusedWithoutAllocatingThem()
    {
        using var dir = new TempDir();
        var img = Base(dir, "zstd");
        byte[] bomb;
        using (var c = new ZstdSharp.Compressor(19))
        {
            bomb = c.Wrap(new byte[64 << 20]).ToArray(); // one frame of 64 MiB: window log 26
        }
        var at = (long)img.Bytes.Length;
        img.Truncate(at + bomb.Length);
        bomb.CopyTo(img.Bytes, at);
        img.SetU64(img.L2Offset, Descriptor(at, bomb.Length, 16));
        ReadFails(img.Save(), "does not decompress");
    }

    [Fact]
    public void ZstdFrameLongerThanAClusterIsCorrupt()
    {
        using var dir = new TempDir();
        var img = Base(dir, "zstd");
        byte[] frame;
        using (var c = new ZstdSharp.Compressor(3))
        {
            frame = c.Wrap(new byte[Cs + 4096]).ToArray(); // a small window, but more than a cluster of output
        }
        var at = (long)img.Bytes.Length;
        img.Truncate(at + frame.Length);
        frame.CopyTo(img.Bytes, at);
        img.SetU64(img.L2Offset, Descriptor(at, frame.Length, 16));
        ReadFails(img.Save(), "more than one cluster");
    }

    [Fact]
    public void ReservedOffsetBitsAreCorrupt()
    {
        using var dir = new TempDir();
        var img = Base(dir, clusterSize: 512);
        // With 512-byte clusters the offset field has 61 bits; bits above 55 are reserved.
        img.SetU64(img.L2Offset, CompressedFlag | (1UL << 58) | 4096);
        using var ro = QcowImage.Open(img.Save(), ReadOnly);
        Guard.Fails<QcowCorruptImageException>(() => ro.Read(0, new byte[512]), "reserved");
    }

    [Fact]
    public void FreeingAHostileDescriptorMarksTheImageCorruptInsteadOfDamagingRefcounts()
    {
        using var dir = new TempDir();
        var img = Base(dir);
        img.SetU64(img.L2Offset, Descriptor(img.Bytes.Length + 10 * Cs, 2000, 16));
        var path = img.Save();
        using (var rw = QcowImage.Open(path))
        {
            Guard.Fails<QcowCorruptImageException>(() => rw.Discard(0, Cs), "compressed");
            rw.IsReadOnly.Should().BeTrue("the image is marked corrupt");
        }
        QemuTools.Img("info", path).StdOut.Should().Contain("corrupt: true");
    }

    [Theory]
    [InlineData(2, 0UL, "unknown compression type")]
    [InlineData(0, 1UL << 3, "must not be set")]
    [InlineData(1, 0UL, "must be set")]
    public void CompressionTypeFieldIsValidatedAsQemuDoes(byte type, ulong bits, string message)
    {
        using var dir = new TempDir();
        var img = Base(dir);
        img.Bytes[104] = type;
        img.SetU64(HostileImage.IncompatibleFeatures, bits);
        var path = img.Save();
        var e = Guard.Run(() => QcowImage.Open(path, ReadOnly).Dispose());
        e.Should().BeAssignableTo<QcowFormatException>();
        e!.Message.Should().Contain(message);
        QemuTools.Img("info", path).ExitCode.Should().NotBe(0, "QEMU refuses it too");
    }
}
