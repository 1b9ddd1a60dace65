using System.Buffers.Binary;
using System.Security.Cryptography;

namespace QcowTier.Heat;

/// <summary>
/// The heat map sidecar file (docs/FORMAT.md, "Heat map files"): a fixed header, then one record per
/// touched region of 4096 units. SHA-256 over everything but the checksum field detects damage; the
/// file is written next to its final name, flushed, then renamed over it, so a crash leaves the old map
/// or the new one, never a torn one.
/// </summary>
internal static class HeatMapFile
{
    public const ulong Magic = 0x5154484541540000; // "QTHEAT\0\0"
    public const uint CurrentVersion = 2; // 2 added the sequential count bytes; version 1 files still load

    public const int OffsetMagic = 0;
    public const int OffsetVersion = 8;
    public const int OffsetUnitBits = 12;
    public const int OffsetVirtualSize = 16;
    public const int OffsetImageId = 24;
    public const int OffsetHalfLife = 40;      // microseconds
    public const int OffsetDecayedAt = 48;     // Unix microseconds
    public const int OffsetWindowStart = 56;   // Unix microseconds, or long.MaxValue when empty
    public const int OffsetWindowEnd = 64;     // Unix microseconds, or long.MinValue when empty
    public const int OffsetTotalReads = 72;
    public const int OffsetTotalWrites = 80;
    public const int OffsetTotalReadBytes = 88;
    public const int OffsetTotalWriteBytes = 96;
    public const int OffsetPageCount = 104;
    public const int OffsetClusterBits = 108;
    public const int OffsetChecksum = 112;     // SHA-256 of bytes [0,112) and [144,end)
    public const int HeaderLength = 144;

    public const int PageHeader = 40;          // index, read ops, write ops, read bytes, write bytes
    public const int PageRecordV1 = PageHeader + 2 * HeatMap.PageUnits;
    public const int PageRecord = PageHeader + 3 * HeatMap.PageUnits;

    public static void Save(HeatMap map, string path)
    {
        var pages = new List<long>();
        for (long i = 0; i < map.Pages.Length; i++)
        {
            if (map.Pages[i] is not null)
            {
                pages.Add(i);
            }
        }
        var header = new byte[HeaderLength];
        BinaryPrimitives.WriteUInt64BigEndian(header.AsSpan(OffsetMagic), Magic);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(OffsetVersion), CurrentVersion);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(OffsetUnitBits), (uint)map.UnitBits);
        BinaryPrimitives.WriteInt64BigEndian(header.AsSpan(OffsetVirtualSize), map.VirtualSize);
        map.ImageId.TryWriteBytes(header.AsSpan(OffsetImageId, 16), bigEndian: true, out _);
        BinaryPrimitives.WriteInt64BigEndian(header.AsSpan(OffsetHalfLife), map.HalfLife.Ticks / 10);
        BinaryPrimitives.WriteInt64BigEndian(header.AsSpan(OffsetDecayedAt), map.DecayedAt.ToUnixTimeMilliseconds() * 1000);
        var (ws, we) = map.WindowTicks;
        BinaryPrimitives.WriteInt64BigEndian(header.AsSpan(OffsetWindowStart), ws == long.MaxValue ? long.MaxValue : TicksToUnixMicros(ws));
        BinaryPrimitives.WriteInt64BigEndian(header.AsSpan(OffsetWindowEnd), we == long.MinValue ? long.MinValue : TicksToUnixMicros(we));
        BinaryPrimitives.WriteInt64BigEndian(header.AsSpan(OffsetTotalReads), map.TotalReads);
        BinaryPrimitives.WriteInt64BigEndian(header.AsSpan(OffsetTotalWrites), map.TotalWrites);
        BinaryPrimitives.WriteInt64BigEndian(header.AsSpan(OffsetTotalReadBytes), map.TotalReadBytes);
        BinaryPrimitives.WriteInt64BigEndian(header.AsSpan(OffsetTotalWriteBytes), map.TotalWriteBytes);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(OffsetPageCount), (uint)pages.Count);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(OffsetClusterBits), (uint)System.Numerics.BitOperations.Log2((uint)map.ClusterSize));

        var full = Path.GetFullPath(path);
        var temp = Path.Combine(Path.GetDirectoryName(full)!, $".{Path.GetFileName(full)}.{Environment.ProcessId}.tmp");
        try
        {
            using (var fs = new FileStream(temp, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 16))
            using (var sha = IncrementalHash.CreateHash(HashAlgorithmName.SHA256))
            {
                sha.AppendData(header, 0, OffsetChecksum);
                fs.Write(header);
                var record = new byte[PageRecord];
                foreach (var p in pages)
                {
                    var page = map.Pages[p]!;
                    BinaryPrimitives.WriteInt64BigEndian(record, p);
                    BinaryPrimitives.WriteInt64BigEndian(record.AsSpan(8), page.ReadOps);
                    BinaryPrimitives.WriteInt64BigEndian(record.AsSpan(16), page.WriteOps);
                    BinaryPrimitives.WriteInt64BigEndian(record.AsSpan(24), page.ReadBytes);
                    BinaryPrimitives.WriteInt64BigEndian(record.AsSpan(32), page.WriteBytes);
                    for (var i = 0; i < HeatMap.PageUnits; i++)
                    {
                        record[PageHeader + i] = HeatMap.GetCode(page.Reads, i);
                        record[PageHeader + HeatMap.PageUnits + i] = HeatMap.GetCode(page.Writes, i);
                        record[PageHeader + 2 * HeatMap.PageUnits + i] = page.Sequential is { } seq ? HeatMap.GetCode(seq, i) : (byte)0;
                    }
                    sha.AppendData(record);
                    fs.Write(record);
                }
                var digest = sha.GetHashAndReset();
                fs.Position = OffsetChecksum;
                fs.Write(digest);
                fs.Flush(flushToDisk: true);
            }
            File.Move(temp, full, overwrite: true);
        }
        catch
        {
            File.Delete(temp);
            throw;
        }
    }

    public static HeatMap Load(string path, Guid? expectedImage)
    {
        using var fs = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 16);
        var header = new byte[HeaderLength];
        if (fs.Length < HeaderLength)
        {
            ThrowHelper.Corrupt(path, 0, "heat map header", $"the file is {fs.Length} bytes, shorter than a heat map header ({HeaderLength} bytes)");
        }
        fs.ReadExactly(header);
        if (BinaryPrimitives.ReadUInt64BigEndian(header) != Magic)
        {
            ThrowHelper.Format(path, OffsetMagic, "magic", "not a QcowTier heat map (bad magic)");
        }
        var version = BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(OffsetVersion));
        if (version is not (1 or CurrentVersion))
        {
            ThrowHelper.Unsupported(path, OffsetVersion, "version", $"heat map version {version} is not supported (this QcowTier reads versions 1 and {CurrentVersion})");
        }
        var recordLength = version == 1 ? PageRecordV1 : PageRecord;
        var unitBits = (int)BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(OffsetUnitBits));
        var clusterBits = (int)BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(OffsetClusterBits));
        var size = BinaryPrimitives.ReadInt64BigEndian(header.AsSpan(OffsetVirtualSize));
        if (clusterBits is < 9 or > 21 || unitBits < clusterBits || unitBits > 40)
        {
            ThrowHelper.Corrupt(path, OffsetUnitBits, "unit_bits", $"unit bits {unitBits} / cluster bits {clusterBits} are out of range");
        }
        if (size < 0 || size > Format.QcowHeader.MaxVirtualSize)
        {
            ThrowHelper.Corrupt(path, OffsetVirtualSize, "virtual size", $"virtual size {size} is out of range");
        }
        var halfLifeMicros = BinaryPrimitives.ReadInt64BigEndian(header.AsSpan(OffsetHalfLife));
        if (halfLifeMicros <= 0 || halfLifeMicros > TimeSpan.MaxValue.Ticks / 10)
        {
            ThrowHelper.Corrupt(path, OffsetHalfLife, "half-life", $"half-life {halfLifeMicros} µs is out of range");
        }
        var id = new Guid(header.AsSpan(OffsetImageId, 16), bigEndian: true);
        if (expectedImage is { } want && want != id)
        {
            throw new QcowFormatException($"the heat map belongs to image {id}, not to this image ({want})", path, OffsetImageId, "image id");
        }
        var pageCount = BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(OffsetPageCount));
        if (fs.Length != HeaderLength + (long)pageCount * recordLength)
        {
            ThrowHelper.Corrupt(path, OffsetPageCount, "page count", $"{pageCount} regions need {HeaderLength + (long)pageCount * recordLength} bytes; the file has {fs.Length} (truncated or padded)");
        }
        HeatMap map;
        try
        {
            map = new HeatMap(size, 1 << clusterBits, 1 << (unitBits - clusterBits), TimeSpan.FromTicks(halfLifeMicros * 10), id);
        }
        catch (ArgumentException e)
        {
            throw new QcowCorruptImageException($"the heat map's geometry is not usable: {e.Message}", path, OffsetUnitBits, "unit_bits");
        }
        if (pageCount > map.Pages.Length)
        {
            ThrowHelper.Corrupt(path, OffsetPageCount, "page count", $"{pageCount} regions, but the disk has only {map.Pages.Length}");
        }
        using var sha = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        sha.AppendData(header, 0, OffsetChecksum);
        var record = new byte[recordLength];
        var seen = new HashSet<long>();
        for (var n = 0; n < pageCount; n++)
        {
            var at = fs.Position;
            fs.ReadExactly(record);
            sha.AppendData(record);
            var index = BinaryPrimitives.ReadInt64BigEndian(record);
            if (index < 0 || index >= map.Pages.Length || !seen.Add(index))
            {
                ThrowHelper.Corrupt(path, at, "region index", $"region index {index} is out of range or repeated");
            }
            var page = map.GetOrAddPage(index);
            page.ReadOps = BinaryPrimitives.ReadInt64BigEndian(record.AsSpan(8));
            page.WriteOps = BinaryPrimitives.ReadInt64BigEndian(record.AsSpan(16));
            page.ReadBytes = BinaryPrimitives.ReadInt64BigEndian(record.AsSpan(24));
            page.WriteBytes = BinaryPrimitives.ReadInt64BigEndian(record.AsSpan(32));
            for (var i = 0; i < HeatMap.PageUnits; i++)
            {
                HeatMap.SetCode(page.Reads, i, record[PageHeader + i]);
                HeatMap.SetCode(page.Writes, i, record[PageHeader + HeatMap.PageUnits + i]);
            }
            if (version >= 2 && record.AsSpan(PageHeader + 2 * HeatMap.PageUnits, HeatMap.PageUnits).ContainsAnyExcept((byte)0))
            {
                var seq = HeatMap.SequentialOf(page);
                for (var i = 0; i < HeatMap.PageUnits; i++)
                {
                    HeatMap.SetCode(seq, i, record[PageHeader + 2 * HeatMap.PageUnits + i]);
                }
            }
        }
        if (!sha.GetHashAndReset().AsSpan().SequenceEqual(header.AsSpan(OffsetChecksum, 32)))
        {
            ThrowHelper.Corrupt(path, OffsetChecksum, "checksum", "the heat map's SHA-256 does not match its content (damaged file)");
        }
        var ws = BinaryPrimitives.ReadInt64BigEndian(header.AsSpan(OffsetWindowStart));
        var we = BinaryPrimitives.ReadInt64BigEndian(header.AsSpan(OffsetWindowEnd));
        map.RestoreTotals(
            BinaryPrimitives.ReadInt64BigEndian(header.AsSpan(OffsetTotalReads)),
            BinaryPrimitives.ReadInt64BigEndian(header.AsSpan(OffsetTotalWrites)),
            BinaryPrimitives.ReadInt64BigEndian(header.AsSpan(OffsetTotalReadBytes)),
            BinaryPrimitives.ReadInt64BigEndian(header.AsSpan(OffsetTotalWriteBytes)),
            ws == long.MaxValue ? long.MaxValue : UnixMicrosToTicks(ws, path, OffsetWindowStart),
            we == long.MinValue ? long.MinValue : UnixMicrosToTicks(we, path, OffsetWindowEnd));
        map.DecayedAt = new DateTimeOffset(UnixMicrosToTicks(BinaryPrimitives.ReadInt64BigEndian(header.AsSpan(OffsetDecayedAt)), path, OffsetDecayedAt), TimeSpan.Zero);
        return map;
    }

    private static long TicksToUnixMicros(long ticks) => (ticks - DateTimeOffset.UnixEpoch.UtcTicks) / 10;

    private static long UnixMicrosToTicks(long micros, string path, int field)
    {
        var maxMicros = (DateTimeOffset.MaxValue.UtcTicks - DateTimeOffset.UnixEpoch.UtcTicks) / 10;
        var minMicros = -DateTimeOffset.UnixEpoch.UtcTicks / 10;
        if (micros < minMicros || micros > maxMicros)
        {
            ThrowHelper.Corrupt(path, field, "timestamp", $"timestamp {micros} µs is out of range");
        }
        return DateTimeOffset.UnixEpoch.UtcTicks + micros * 10;
    }
}
