using System.Buffers.Binary;
using System.Text.Json;
using QcowTier.Check;
using QcowTier.Format;
using QcowTier.Storage;
using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Check;

/// <summary>What qemu-img check --output=json says (absent fields are zero, as qemu-img omits them).</summary>
internal sealed record QemuCheck(
    int ExitCode,
    bool HasReport,
    long Corruptions,
    long Leaks,
    long CheckErrors,
    long CorruptionsFixed,
    long LeaksFixed,
    long ImageEndOffset,
    long TotalClusters,
    long AllocatedClusters,
    long FragmentedClusters,
    long CompressedClusters,
    string StdErr)
{
    public override string ToString()
        => $"exit={ExitCode} corruptions={Corruptions} leaks={Leaks} check-errors={CheckErrors} fixed={CorruptionsFixed}/{LeaksFixed} end={ImageEndOffset} total={TotalClusters} alloc={AllocatedClusters} frag={FragmentedClusters} comp={CompressedClusters}\n{StdErr}";
}

/// <summary>Runs both checkers on copies of an image and pokes bytes into images.</summary>
internal static class CheckHarness
{
    public static QemuCheck Qemu(string path, string? repair = null)
    {
        var args = new List<string> { "check", "-f", "qcow2", "--output=json" };
        if (repair is not null)
        {
            args.Add("-r");
            args.Add(repair);
        }
        args.Add(path);
        var r = Infrastructure.Qemu.Run("qemu-img", args);
        var json = r.StdOut.Trim();
        if (json.Length == 0 || json[0] != '{')
        {
            return new QemuCheck(r.ExitCode, false, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, r.StdErr);
        }
        using var doc = JsonDocument.Parse(json);
        long Get(string name) => doc.RootElement.TryGetProperty(name, out var v) ? v.GetInt64() : 0;
        return new QemuCheck(r.ExitCode, true, Get("corruptions"), Get("leaks"), Get("check-errors"), Get("corruptions-fixed"), Get("leaks-fixed"),
            Get("image-end-offset"), Get("total-clusters"), Get("allocated-clusters"), Get("fragmented-clusters"), Get("compressed-clusters"), r.StdErr);
    }

    /// <summary>Our check through the public API: read-only unless repairing.</summary>
    public static QcowCheckResult Ours(string path, QcowRepairMode mode = QcowRepairMode.None)
    {
        using var image = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = mode == QcowRepairMode.None });
        return image.Check(mode);
    }

    /// <summary>Our checker straight on the file, bypassing the engine (which will not open images with snapshots for writing).</summary>
    public static QcowCheckResult OursDirect(string path, QcowRepairMode mode = QcowRepairMode.None)
    {
        using var storage = FileStorage.Open(path, writable: mode != QcowRepairMode.None);
        var probe = new byte[(int)Math.Min(storage.Length, 1 << QcowHeader.MaxClusterBits)];
        storage.Read(0, probe);
        var header = QcowHeader.Parse(probe, storage.Length, path);
        return QcowChecker.Run(storage, header, mode);
    }

    public static string Describe(QcowCheckResult r)
        => $"exit={r.ExitCode} corruptions={r.Corruptions} leaks={r.Leaks} check-errors={r.CheckErrors} fixed={r.CorruptionsFixed}/{r.LeaksFixed} end={r.ImageEndOffset} total={r.TotalClusters} alloc={r.AllocatedClusters} frag={r.FragmentedClusters} comp={r.CompressedClusters}\n"
           + string.Join('\n', r.Messages.Take(60));

    /// <summary>The counts qemu-img check reports must be ours exactly.</summary>
    public static void ShouldMatch(this QcowCheckResult ours, QemuCheck qemu, string? context = null)
    {
        var because = $"{context}\nqemu-img: {qemu}\nours: {Describe(ours)}";
        ours.ExitCode.Should().Be(qemu.ExitCode, because);
        if (!qemu.HasReport)
        {
            return;
        }
        ours.Corruptions.Should().Be((int)qemu.Corruptions, because);
        ours.Leaks.Should().Be((int)qemu.Leaks, because);
        ours.CheckErrors.Should().Be((int)qemu.CheckErrors, because);
    }

    /// <summary>On an image without damage to the data mapping, the allocation figures must match too.</summary>
    public static void ShouldMatchFigures(this QcowCheckResult ours, QemuCheck qemu)
    {
        ours.ShouldMatch(qemu);
        var because = $"qemu-img: {qemu}\nours: {Describe(ours)}";
        ours.ImageEndOffset.Should().Be(qemu.ImageEndOffset, because);
        ours.TotalClusters.Should().Be(qemu.TotalClusters, because);
        ours.AllocatedClusters.Should().Be(qemu.AllocatedClusters, because);
        ours.FragmentedClusters.Should().Be(qemu.FragmentedClusters, because);
        ours.CompressedClusters.Should().Be(qemu.CompressedClusters, because);
    }

    public static string Copy(TempDir dir, string source, string name)
    {
        var dest = dir.File(name);
        File.Copy(source, dest, overwrite: true);
        return dest;
    }

    public static void QemuImgOk(params string[] args) => Infrastructure.Qemu.Img(args).EnsureSuccess();

    public static void QemuIoOk(string path, params string[] commands)
    {
        var args = new List<string> { "-f", "qcow2" };
        foreach (var c in commands)
        {
            args.Add("-c");
            args.Add(c);
        }
        args.Add(path);
        Infrastructure.Qemu.Run("qemu-io", args).EnsureSuccess();
    }
}

/// <summary>Byte-level access to an image file, to damage it the way a bug or a bad disk would.</summary>
public sealed class RawImage
{
    private readonly string _path;

    public RawImage(string path)
    {
        _path = path;
        Span<byte> h = stackalloc byte[104];
        using (var f = File.OpenRead(path))
        {
            f.ReadExactly(h);
        }
        ClusterBits = (int)BinaryPrimitives.ReadUInt32BigEndian(h[20..]);
        L1Offset = (long)BinaryPrimitives.ReadUInt64BigEndian(h[40..]);
        L1Size = BinaryPrimitives.ReadUInt32BigEndian(h[36..]);
        RefcountTableOffset = (long)BinaryPrimitives.ReadUInt64BigEndian(h[48..]);
        var version = BinaryPrimitives.ReadUInt32BigEndian(h[4..]);
        RefcountOrder = version >= 3 ? (int)BinaryPrimitives.ReadUInt32BigEndian(h[96..]) : 4;
    }

    public int ClusterBits { get; }

    public int ClusterSize => 1 << ClusterBits;

    public long L1Offset { get; }

    public uint L1Size { get; }

    public long RefcountTableOffset { get; }

    public int RefcountOrder { get; }

    public long Length => new FileInfo(_path).Length;

    public ulong ReadU64(long offset)
    {
        Span<byte> b = stackalloc byte[8];
        using var f = File.OpenRead(_path);
        f.Position = offset;
        f.ReadExactly(b);
        return BinaryPrimitives.ReadUInt64BigEndian(b);
    }

    public void WriteU64(long offset, ulong value)
    {
        Span<byte> b = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(b, value);
        WriteBytes(offset, b);
    }

    public void WriteBytes(long offset, ReadOnlySpan<byte> data)
    {
        using var f = new FileStream(_path, FileMode.Open, FileAccess.ReadWrite);
        f.Position = offset;
        f.Write(data);
    }

    public long L1EntryOffset(int index) => L1Offset + index * 8L;

    public ulong L1Entry(int index) => ReadU64(L1EntryOffset(index));

    /// <summary>Where the L2 entry of a guest cluster lives (its L2 table must exist).</summary>
    public long L2EntryOffset(long guestCluster)
    {
        var l2Bits = ClusterBits - 3;
        var l2 = (long)(L1Entry((int)(guestCluster >> l2Bits)) & ClusterLayout.L1OffsetMask);
        return l2 + (guestCluster & ((1L << l2Bits) - 1)) * 8;
    }

    public ulong L2Entry(long guestCluster) => ReadU64(L2EntryOffset(guestCluster));

    public long HostCluster(long guestCluster) => (long)(L2Entry(guestCluster) & ClusterLayout.L2OffsetMask) >> ClusterBits;

    public long RefcountTableEntryOffset(int index) => RefcountTableOffset + index * 8L;

    public ulong RefcountTableEntry(int index) => ReadU64(RefcountTableEntryOffset(index));

    public ulong Refcount(long cluster)
    {
        var (block, index) = Locate(cluster);
        var data = new byte[ClusterSize];
        using (var f = File.OpenRead(_path))
        {
            f.Position = block;
            f.ReadExactly(data);
        }
        return RefcountBlock.Get(data, index, RefcountOrder);
    }

    public void SetRefcount(long cluster, ulong value)
    {
        var (block, index) = Locate(cluster);
        var data = new byte[ClusterSize];
        using var f = new FileStream(_path, FileMode.Open, FileAccess.ReadWrite);
        f.Position = block;
        f.ReadExactly(data);
        RefcountBlock.Set(data, index, RefcountOrder, value);
        f.Position = block;
        f.Write(data);
    }

    private (long Block, int Index) Locate(long cluster)
    {
        var blockBits = ClusterBits + 3 - RefcountOrder;
        var block = (long)(RefcountTableEntry((int)(cluster >> blockBits)) & OnDiskRefcounts.OffsetMask);
        return (block, (int)(cluster & ((1L << blockBits) - 1)));
    }
}
