using System.Buffers.Binary;
using System.Numerics;

namespace QcowTier.Heat.Import;

/// <summary>
/// Reads the persistent dirty bitmaps of a qcow2 image (docs/interop/qcow2.txt, "Bitmaps extension",
/// "Bitmaps") straight from the file, without opening it as an image: a bitmap is often wanted from an
/// image another process has open. Every size taken from the file is checked against the file's length
/// and QEMU's own limits before anything is allocated or read.
/// </summary>
internal static class DirtyBitmapImporter
{
    private const uint QcowMagic = 0x514649fb;
    private const uint ExtensionBitmaps = 0x23852875;
    private const ulong AutoclearBitmaps = 1;
    private const uint MaxBitmaps = 65535;                       // QEMU's QCOW2_MAX_BITMAPS
    private const long MaxDirectorySize = 1024L * MaxBitmaps;    // QCOW2_MAX_BITMAP_DIRECTORY_SIZE
    private const uint MaxTableSize = 0x8000000;                 // BME_MAX_TABLE_SIZE
    private const long MaxBitmapBytes = 0x20000000;              // BME_MAX_PHYS_SIZE
    private const int MaxNameSize = 1023;                        // BME_MAX_NAME_SIZE
    private const int EntryHeaderSize = 24;
    private const uint FlagInUse = 1;
    private const uint FlagExtraDataCompatible = 4;
    private const uint ReservedFlags = ~7u;
    private const byte TypeDirtyTracking = 1;
    private const ulong TableReservedMask = 0xff000000000001feUL;
    private const ulong TableOffsetMask = 0x00fffffffffffe00UL;
    private const ulong TableAllOnes = 1;
    private const int TableChunkEntries = 4096;

    private sealed record Bitmap(string Name, long EntryOffset, long TableOffset, uint TableSize, uint Flags, byte Type, int GranularityBits, uint ExtraSize)
    {
        public long Granularity => 1L << GranularityBits;
        public bool InUse => (Flags & FlagInUse) != 0;
        public string? Unusable(bool named) =>
            Type != TypeDirtyTracking ? $"bitmap \"{Name}\" is of type {Type}, not a dirty tracking bitmap"
            : ExtraSize != 0 && (Flags & FlagExtraDataCompatible) == 0 ? $"bitmap \"{Name}\" has extra data this reader does not know and is not marked compatible"
            : InUse && !named ? $"bitmap \"{Name}\" is marked in use (not saved cleanly): skipped; name it to import it anyway"
            : null;
    }

    private sealed class Reader(Stream stream, string? fileName)
    {
        public readonly long FileLength = stream.Length;
        public readonly string? FileName = fileName;
        public long BytesRead;

        public void Read(long offset, Span<byte> buffer, string field)
        {
            if (offset < 0 || offset > FileLength || buffer.Length > FileLength - offset)
            {
                throw new QcowCorruptImageException($"{buffer.Length} bytes at 0x{offset:x} lie beyond the end of the file (0x{FileLength:x} bytes)", FileName, offset, field);
            }
            stream.Seek(offset, SeekOrigin.Begin);
            stream.ReadExactly(buffer);
            BytesRead += buffer.Length;
        }
    }

    public static HeatImportResult Import(Stream image, string? fileName, HeatMap target, HeatImportOptions options, IProgress<HeatImportProgress>? progress, CancellationToken cancellationToken)
    {
        if (!image.CanSeek || !image.CanRead)
        {
            throw new ArgumentException("dirty bitmaps are read from the qcow2 image itself, which needs a readable, seekable stream", nameof(image));
        }
        cancellationToken.ThrowIfCancellationRequested();
        var file = new Reader(image, fileName);
        string? chosenName = null;
        var session = new ImportSession(target, options, HeatTraceFormat.QemuDirtyBitmap, name => name == chosenName, filtered: true);

        var (clusterBits, virtualSize, bitmaps) = ReadDirectory(file, session);
        if (bitmaps.Count == 0)
        {
            return session.Finish(0);
        }
        if (virtualSize != target.VirtualSize)
        {
            session.AddWarning($"the image's virtual size ({virtualSize} bytes) differs from the heat map's ({target.VirtualSize} bytes)");
        }
        var clusterSize = 1 << clusterBits;

        // Count every bitmap first: it tells the caller what is there, and picks the busiest by default.
        // Clusters of distinct bitmaps never overlap in a sound image, so the reads add up to at most the file.
        var counts = new long[bitmaps.Count];
        var budget = file.FileLength;
        for (var i = 0; i < bitmaps.Count; i++)
        {
            counts[i] = Walk(file, bitmaps[i], clusterSize, virtualSize, ref budget, null, cancellationToken);
        }

        Bitmap? chosen = null;
        if (options.BitmapName is { } wanted)
        {
            chosen = bitmaps.FirstOrDefault(b => b.Name == wanted)
                ?? throw new ArgumentException($"{fileName ?? "the image"} has no bitmap \"{wanted}\"; it has {string.Join(", ", bitmaps.Select(b => $"\"{b.Name}\""))}", nameof(options));
            if (chosen.Unusable(named: true) is { } why)
            {
                throw new QcowUnsupportedFeatureException(why, fileName, chosen.EntryOffset, "bitmap directory entry");
            }
            if (chosen.InUse)
            {
                session.AddWarning($"bitmap \"{chosen.Name}\" is marked in use (QEMU did not save it cleanly): its contents may be out of date");
            }
        }
        else
        {
            for (var i = 0; i < bitmaps.Count; i++)
            {
                if (bitmaps[i].Unusable(named: false) is { } why)
                {
                    session.AddWarning(why);
                }
                else if (chosen is null || counts[i] > counts[bitmaps.IndexOf(chosen)])
                {
                    chosen = bitmaps[i];
                }
            }
        }
        if (chosen is null)
        {
            session.AddWarning("no bitmap can be imported");
        }
        for (var i = 0; i < bitmaps.Count; i++)
        {
            if (bitmaps[i] != chosen)
            {
                session.AddUnimported(bitmaps[i].Name, 0, counts[i]);
            }
        }
        if (chosen is not null)
        {
            chosenName = chosen.Name;
            session.Register(chosen.Name);
            var again = file.FileLength;
            long clusters = 0;
            Walk(file, chosen, clusterSize, virtualSize, ref again, (granule, gran) =>
            {
                session.OnIo(write: true, granule * gran, gran, TraceTime.None, 0, chosen.Name);
            }, cancellationToken, () =>
            {
                clusters++;
                if ((clusters & 63) == 0)
                {
                    progress?.Report(new HeatImportProgress(clusters, session.IosSeen, file.BytesRead));
                }
            });
        }
        var result = session.Finish(0);
        progress?.Report(new HeatImportProgress(0, session.IosSeen, file.BytesRead));
        return result;
    }

    private static (int ClusterBits, long VirtualSize, List<Bitmap> Bitmaps) ReadDirectory(Reader file, ImportSession session)
    {
        Span<byte> h = stackalloc byte[104];
        if (file.FileLength < 72)
        {
            throw new QcowFormatException("too short for a qcow2 header", file.FileName, 0, "header");
        }
        file.Read(0, h[..72], "header");
        if (BinaryPrimitives.ReadUInt32BigEndian(h) != QcowMagic)
        {
            throw new QcowFormatException("not a qcow2 image", file.FileName, 0, "magic");
        }
        var version = BinaryPrimitives.ReadUInt32BigEndian(h[4..]);
        var clusterBits = BinaryPrimitives.ReadInt32BigEndian(h[20..]);
        if (clusterBits is < 9 or > 21)
        {
            throw new QcowFormatException($"cluster_bits {clusterBits} is outside 9..21", file.FileName, 20, "cluster_bits");
        }
        var size = BinaryPrimitives.ReadUInt64BigEndian(h[24..]);
        if (size > 1UL << 62)
        {
            throw new QcowFormatException($"virtual size {size} is too large", file.FileName, 24, "size");
        }
        if (version < 3)
        {
            session.AddWarning("a version 2 image has no persistent dirty bitmaps");
            return (clusterBits, (long)size, []);
        }
        if (file.FileLength < 104)
        {
            throw new QcowFormatException("too short for a version 3 header", file.FileName, 0, "header");
        }
        file.Read(0, h, "header");
        var autoclear = BinaryPrimitives.ReadUInt64BigEndian(h[88..]);
        var headerLength = BinaryPrimitives.ReadUInt32BigEndian(h[100..]);
        var clusterSize = 1 << clusterBits;
        if (headerLength < 104 || headerLength > clusterSize || headerLength % 8 != 0)
        {
            throw new QcowFormatException($"header_length {headerLength} is not a multiple of 8 between 104 and the cluster size", file.FileName, 100, "header_length");
        }

        // Header extensions fill the rest of the first cluster at most.
        var area = new byte[(int)Math.Min(clusterSize - headerLength, Math.Max(0, file.FileLength - headerLength))];
        file.Read(headerLength, area, "header extensions");
        byte[]? ext = null;
        long extOffset = -1;
        for (var pos = 0; pos + 8 <= area.Length;)
        {
            var type = BinaryPrimitives.ReadUInt32BigEndian(area.AsSpan(pos));
            var len = BinaryPrimitives.ReadUInt32BigEndian(area.AsSpan(pos + 4));
            if (type == 0)
            {
                break;
            }
            if (len > area.Length - pos - 8)
            {
                throw new QcowCorruptImageException($"header extension 0x{type:x8} of {len} bytes runs past the first cluster", file.FileName, headerLength + pos + 4, "header extension length");
            }
            if (type == ExtensionBitmaps)
            {
                ext = area.AsSpan(pos + 8, (int)len).ToArray();
                extOffset = headerLength + pos + 8;
                break;
            }
            pos += 8 + (int)((len + 7) & ~7u);
        }
        if (ext is null)
        {
            session.AddWarning("the image has no persistent dirty bitmaps");
            return (clusterBits, (long)size, []);
        }
        if ((autoclear & AutoclearBitmaps) == 0)
        {
            session.AddWarning("the bitmaps are stale: autoclear bit 0 is clear, so a program that does not know bitmaps has written the image since");
            return (clusterBits, (long)size, []);
        }
        if (ext.Length != 24)
        {
            throw new QcowCorruptImageException($"the bitmaps extension has {ext.Length} bytes, not 24", file.FileName, extOffset - 4, "bitmaps extension length");
        }
        var count = BinaryPrimitives.ReadUInt32BigEndian(ext);
        var reserved = BinaryPrimitives.ReadUInt32BigEndian(ext.AsSpan(4));
        var dirSize = BinaryPrimitives.ReadUInt64BigEndian(ext.AsSpan(8));
        var dirOffset = BinaryPrimitives.ReadUInt64BigEndian(ext.AsSpan(16));
        if (count == 0 || count > MaxBitmaps)
        {
            throw new QcowCorruptImageException($"nb_bitmaps {count} is outside 1..{MaxBitmaps}", file.FileName, extOffset, "nb_bitmaps");
        }
        if (reserved != 0)
        {
            throw new QcowCorruptImageException("the reserved field is not zero", file.FileName, extOffset + 4, "bitmaps extension reserved");
        }
        if (dirSize < EntryHeaderSize || dirSize > (ulong)MaxDirectorySize || dirSize > (ulong)file.FileLength)
        {
            throw new QcowCorruptImageException($"bitmap_directory_size {dirSize} is outside {EntryHeaderSize}..{Math.Min(MaxDirectorySize, file.FileLength)}", file.FileName, extOffset + 8, "bitmap_directory_size");
        }
        if (dirOffset % (ulong)clusterSize != 0 || dirOffset == 0 || dirOffset > (ulong)file.FileLength)
        {
            throw new QcowCorruptImageException($"bitmap_directory_offset 0x{dirOffset:x} is not a cluster inside the file", file.FileName, extOffset + 16, "bitmap_directory_offset");
        }
        var dir = new byte[(int)dirSize];
        file.Read((long)dirOffset, dir, "bitmap directory");

        var list = new List<Bitmap>();
        var pos2 = 0;
        for (var i = 0; i < count; i++)
        {
            var at = (long)dirOffset + pos2;
            if (pos2 + EntryHeaderSize > dir.Length)
            {
                throw new QcowCorruptImageException($"bitmap directory entry {i} of {count} runs past the directory", file.FileName, at, "bitmap_directory_size");
            }
            var e = dir.AsSpan(pos2);
            var tableOffset = BinaryPrimitives.ReadUInt64BigEndian(e);
            var tableSize = BinaryPrimitives.ReadUInt32BigEndian(e[8..]);
            var flags = BinaryPrimitives.ReadUInt32BigEndian(e[12..]);
            var type = e[16];
            var granBits = e[17];
            var nameSize = BinaryPrimitives.ReadUInt16BigEndian(e[18..]);
            var extraSize = BinaryPrimitives.ReadUInt32BigEndian(e[20..]);
            var entrySize = (EntryHeaderSize + (long)nameSize + extraSize + 7) & ~7L;
            if (entrySize > dir.Length - pos2)
            {
                throw new QcowCorruptImageException($"bitmap directory entry {i} ({entrySize} bytes) runs past the directory", file.FileName, at + 18, "name_size/extra_data_size");
            }
            if (nameSize is 0 or > MaxNameSize)
            {
                throw new QcowCorruptImageException($"bitmap name size {nameSize} is outside 1..{MaxNameSize}", file.FileName, at + 18, "name_size");
            }
            if ((flags & ReservedFlags) != 0)
            {
                throw new QcowCorruptImageException($"reserved bitmap flags are set (0x{flags:x})", file.FileName, at + 12, "flags");
            }
            if (granBits > 62)
            {
                throw new QcowCorruptImageException($"granularity_bits {granBits} is larger than 62", file.FileName, at + 17, "granularity_bits");
            }
            var gran = 1UL << granBits;
            var granules = size / gran + (size % gran != 0 ? 1UL : 0);
            var bytes = granules / 8 + (granules % 8 != 0 ? 1UL : 0);
            var expected = bytes / (ulong)clusterSize + (bytes % (ulong)clusterSize != 0 ? 1UL : 0);
            if (tableSize != expected)
            {
                throw new QcowCorruptImageException($"bitmap_table_size {tableSize} does not match the {expected} clusters a {size}-byte disk needs at granularity {gran}", file.FileName, at + 8, "bitmap_table_size");
            }
            if (tableSize > MaxTableSize || (long)tableSize * clusterSize > MaxBitmapBytes)
            {
                throw new QcowUnsupportedFeatureException($"bitmap of {(long)tableSize * clusterSize} bytes is larger than QEMU's limit of {MaxBitmapBytes}", file.FileName, at + 8, "bitmap_table_size");
            }
            if (tableOffset % (ulong)clusterSize != 0 || (tableSize > 0 && (tableOffset == 0 || tableOffset > (ulong)file.FileLength || (ulong)tableSize * 8 > (ulong)file.FileLength - tableOffset)))
            {
                throw new QcowCorruptImageException($"bitmap table at 0x{tableOffset:x} ({tableSize} entries) is not a cluster-aligned range inside the file", file.FileName, at, "bitmap_table_offset");
            }
            string name;
            try
            {
                name = new System.Text.UTF8Encoding(false, true).GetString(dir, pos2 + EntryHeaderSize + (int)extraSize, nameSize);
            }
            catch (System.Text.DecoderFallbackException ex)
            {
                throw new QcowCorruptImageException($"bitmap name is not UTF-8: {ex.Message}", file.FileName, at + EntryHeaderSize + extraSize, "name");
            }
            list.Add(new Bitmap(name, at, (long)tableOffset, tableSize, flags, type, granBits, extraSize));
            pos2 += (int)entrySize;
        }
        return (clusterBits, (long)size, list);
    }

    /// <summary>
    /// Visits every dirty granule of a bitmap in disk order, or only counts them when <paramref name="onDirty"/>
    /// is null. <paramref name="budget"/> is the number of data bytes still allowed to be read.
    /// </summary>
    private static long Walk(Reader file, Bitmap b, int clusterSize, long virtualSize, ref long budget, Action<long, long>? onDirty, CancellationToken cancellationToken, Action? onCluster = null)
    {
        var granules = virtualSize == 0 ? 0 : (virtualSize - 1) / b.Granularity + 1;
        var bitsPerCluster = (long)clusterSize * 8;
        var table = new byte[Math.Min(b.TableSize, TableChunkEntries) * 8];
        var data = new byte[clusterSize];
        long dirty = 0;
        for (long first = 0; first < b.TableSize; first += TableChunkEntries)
        {
            var n = (int)Math.Min(TableChunkEntries, b.TableSize - first);
            file.Read(b.TableOffset + first * 8, table.AsSpan(0, n * 8), "bitmap table");
            for (var j = 0; j < n; j++)
            {
                cancellationToken.ThrowIfCancellationRequested();
                var index = first + j;
                var entryAt = b.TableOffset + index * 8;
                var entry = BinaryPrimitives.ReadUInt64BigEndian(table.AsSpan(j * 8));
                if ((entry & TableReservedMask) != 0)
                {
                    throw new QcowCorruptImageException($"bitmap \"{b.Name}\" table entry {index} has reserved bits set (0x{entry:x16})", file.FileName, entryAt, "bitmap table entry");
                }
                var offset = (long)(entry & TableOffsetMask);
                var firstGranule = index * bitsPerCluster;
                var inCluster = Math.Min(bitsPerCluster, granules - firstGranule);
                if (offset == 0)
                {
                    if ((entry & TableAllOnes) != 0)
                    {
                        dirty += inCluster;
                        if (onDirty is not null)
                        {
                            for (long g = 0; g < inCluster; g++)
                            {
                                onDirty(firstGranule + g, b.Granularity);
                            }
                        }
                    }
                    onCluster?.Invoke();
                    continue;
                }
                if ((entry & TableAllOnes) != 0 || offset % clusterSize != 0)
                {
                    throw new QcowCorruptImageException($"bitmap \"{b.Name}\" table entry {index} (0x{entry:x16}) is not a cluster-aligned offset", file.FileName, entryAt, "bitmap table entry");
                }
                budget -= clusterSize;
                if (budget < 0)
                {
                    throw new QcowCorruptImageException("the bitmaps' data clusters add up to more than the file: tables must share clusters", file.FileName, entryAt, "bitmap table entry");
                }
                file.Read(offset, data, "bitmap data");
                var bytes = (int)((inCluster + 7) / 8);
                for (var k = 0; k < bytes; k++)
                {
                    int v = data[k];
                    if (k == bytes - 1 && inCluster % 8 != 0)
                    {
                        v &= (1 << (int)(inCluster % 8)) - 1; // tail bits past the disk's end are not granules
                    }
                    if (v == 0)
                    {
                        continue;
                    }
                    dirty += BitOperations.PopCount((uint)v);
                    if (onDirty is null)
                    {
                        continue;
                    }
                    while (v != 0)
                    {
                        var bit = BitOperations.TrailingZeroCount(v);
                        onDirty(firstGranule + k * 8L + bit, b.Granularity);
                        v &= v - 1;
                    }
                }
                onCluster?.Invoke();
            }
        }
        return dirty;
    }
}
