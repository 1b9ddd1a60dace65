using System.Buffers.Binary;
using System.Globalization;
using System.Text;
using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Interop.Support;

namespace QcowTier.Tests.Hostile.Support;

/// <summary>
/// A qemu-img-created image, loaded into memory so tests can patch any byte and write it back.
/// The base has data in two places (guest 0..128 KiB with 0x11, guest 1 MiB..+64 KiB with 0x22), so
/// it has an L2 table and data clusters whose offsets tests can locate.
/// </summary>
public sealed class HostileImage
{
    // Header field offsets (docs/interop/qcow2.txt).
    public const int VersionField = 4;
    public const int BackingFileOffset = 8;
    public const int ClusterBits = 20;
    public const int Size = 24;
    public const int CryptMethod = 32;
    public const int L1Size = 36;
    public const int L1TableOffset = 40;
    public const int RefcountTableOffset = 48;
    public const int RefcountTableClusters = 56;
    public const int NbSnapshots = 60;
    public const int IncompatibleFeatures = 72;
    public const int CompatibleFeatures = 80;
    public const int AutoclearFeatures = 88;
    public const int RefcountOrder = 96;
    public const int HeaderLength = 100;

    public const ulong Copied = 1UL << 63;

    private byte[] _bytes;

    private HostileImage(string path, byte[] bytes)
    {
        Path = path;
        _bytes = bytes;
    }

    public string Path { get; }

    public byte[] Bytes => _bytes;

    /// <summary>Creates the base image with qemu-img/qemu-io and loads it.</summary>
    public static HostileImage CreateBase(TempDir dir, string name = "hostile.qcow2", int clusterSize = 65536, string extraOptions = "")
    {
        var path = dir.File(name);
        var opts = string.Create(CultureInfo.InvariantCulture, $"cluster_size={clusterSize}{extraOptions}");
        QemuTools.Img("create", "-q", "-f", "qcow2", "-o", opts, path, "4M").EnsureSuccess();
        QemuTools.Io("-f", "qcow2", "-c", "write -q -P 0x11 0 128k", "-c", "write -q -P 0x22 1M 64k", path).EnsureSuccess();
        return new HostileImage(path, File.ReadAllBytes(path));
    }

    public static HostileImage Load(string path) => new(path, File.ReadAllBytes(path));

    public int ClusterSize => 1 << (int)U32(ClusterBits);

    public long L1Offset => (long)U64(L1TableOffset);

    public long RefcountTable => (long)U64(RefcountTableOffset);

    /// <summary>The L2 table mapping guest offset 0.</summary>
    public long L2Offset => (long)(U64(L1Offset) & 0x00fffffffffffe00UL);

    /// <summary>The first refcount block.</summary>
    public long RefcountBlock => (long)U64(RefcountTable);

    /// <summary>The host cluster of guest cluster <paramref name="index"/> (within the first L2 table).</summary>
    public long DataCluster(int index) => (long)(U64(L2Offset + index * 8L) & 0x00fffffffffffe00UL);

    public uint U32(long offset) => BinaryPrimitives.ReadUInt32BigEndian(_bytes.AsSpan((int)offset));

    public ulong U64(long offset) => BinaryPrimitives.ReadUInt64BigEndian(_bytes.AsSpan((int)offset));

    public HostileImage SetU32(long offset, uint value)
    {
        BinaryPrimitives.WriteUInt32BigEndian(_bytes.AsSpan((int)offset), value);
        return this;
    }

    public HostileImage SetU64(long offset, ulong value)
    {
        BinaryPrimitives.WriteUInt64BigEndian(_bytes.AsSpan((int)offset), value);
        return this;
    }

    public HostileImage Truncate(long length)
    {
        Array.Resize(ref _bytes, (int)length);
        return this;
    }

    /// <summary>Rewrites the header extension area (after header_length) with the given extensions and an end marker.</summary>
    public HostileImage SetExtensions(params (uint Type, byte[] Data)[] extensions)
    {
        var start = (int)U32(HeaderLength);
        var area = _bytes.AsSpan(start, ClusterSize - start);
        area.Clear();
        var pos = 0;
        foreach (var (type, data) in extensions)
        {
            BinaryPrimitives.WriteUInt32BigEndian(area[pos..], type);
            BinaryPrimitives.WriteUInt32BigEndian(area[(pos + 4)..], (uint)data.Length);
            data.CopyTo(area[(pos + 8)..]);
            pos += 8 + ((data.Length + 7) & ~7);
        }
        return this;
    }

    /// <summary>A feature name table (extension 0x6803f857) with the given (type, bit, name) entries.</summary>
    public static byte[] FeatureNameTable(params (byte Type, byte Bit, string Name)[] entries)
    {
        var data = new byte[entries.Length * 48];
        for (var i = 0; i < entries.Length; i++)
        {
            data[i * 48] = entries[i].Type;
            data[i * 48 + 1] = entries[i].Bit;
            Encoding.ASCII.GetBytes(entries[i].Name, data.AsSpan(i * 48 + 2, 46));
        }
        return data;
    }

    public const uint FeatureNameTableType = 0x6803f857;

    /// <summary>QEMU's own feature names, as it writes them.</summary>
    public static readonly (byte Type, byte Bit, string Name)[] QemuFeatures =
    [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];

    /// <summary>Writes the patched bytes to <see cref="Path"/> (or another file) and returns the path.</summary>
    public string Save(string? path = null)
    {
        path ??= Path;
        File.WriteAllBytes(path, _bytes);
        return path;
    }

    public byte[] Slice(long offset, int length) => _bytes.AsSpan((int)offset, length).ToArray();
}
