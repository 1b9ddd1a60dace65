using System.Buffers.Binary;
using System.Text;
using QcowTier.Engine;

namespace QcowTier.Format;

/// <summary>
/// The backing file name (header offsets 8 and 16: offset and length of a name inside cluster 0, at most
/// 1023 bytes, no terminator) and the backing format extension 0xe2792aca (the format's name, shorter than 16).
/// QEMU places the name right after the end-of-extensions marker; so do we.
/// </summary>
internal static class BackingNames
{
    public const int MaxNameBytes = 1023;
    public const int MaxFormatBytes = 15;

    public static void Validate(QcowCreateOptions o)
    {
        if (o.BackingFile is null)
        {
            if (o.BackingFormat is not null)
            {
                throw new ArgumentException("Backing format given without a backing file", nameof(o));
            }
            return;
        }
        ValidateName(o.BackingFile, o.BackingFormat);
        if (o.Preallocation != QcowPreallocation.Off)
        {
            // Preallocated clusters read as zeroes and would hide the backing file (QEMU's wording).
            throw new ArgumentException("Backing file and preallocation can only be used at the same time if extended_l2 is on", nameof(o));
        }
        if (o.Tier is not null)
        {
            throw new ArgumentException("Tiered images with a backing file are not supported (tier data lives in whole images only)", nameof(o));
        }
    }

    public static void ValidateName(string name, string? format)
    {
        if (name.Length == 0 || Encoding.UTF8.GetByteCount(name) > MaxNameBytes)
        {
            throw new ArgumentException($"The backing file name must be 1 to {MaxNameBytes} bytes long", nameof(name));
        }
        if (BackingLayer.HasProtocol(name))
        {
            throw new ArgumentException($"Backing file '{name}' names a protocol or json: description; only plain files are supported", nameof(name));
        }
        if (format is not (null or "qcow2" or "raw"))
        {
            throw new ArgumentException($"Backing file format '{format}' is not supported (qcow2 and raw are)", nameof(format));
        }
    }

    /// <summary>
    /// Whether QEMU's feature name table still fits in cluster 0 beside the backing format extension and the
    /// name; QEMU leaves the (optional) table out when it does not (512-byte clusters), and so do we.
    /// </summary>
    public static bool FitsWithFeatureTable(QcowHeader h, int clusterSize, string? name)
    {
        if (name is null)
        {
            return true;
        }
        var table = HeaderExtension.QemuFeatureNameTable().Length;
        var used = QcowHeader.V3Length + h.Extensions.Sum(e => 8 + ((e.Data.Length + 7) & ~7)) + 8 + table + 8 + Encoding.UTF8.GetByteCount(name);
        return used <= clusterSize;
    }

    /// <summary>Writes the name after the end marker of a freshly serialized cluster 0, and the header fields pointing at it.</summary>
    public static void WriteName(QcowHeader h, Span<byte> cluster0, string? name)
    {
        if (name is null)
        {
            return;
        }
        var pos = (h.Version >= 3 ? QcowHeader.V3Length : QcowHeader.V2Length) + h.Extensions.Sum(e => 8 + ((e.Data.Length + 7) & ~7)) + 8;
        var bytes = Encoding.UTF8.GetBytes(name);
        if (pos + bytes.Length > cluster0.Length)
        {
            throw new ArgumentException($"The backing file name does not fit in the header cluster of {cluster0.Length} bytes", nameof(name));
        }
        bytes.CopyTo(cluster0[pos..]);
        BinaryPrimitives.WriteUInt64BigEndian(cluster0[QcowHeader.OffsetBackingFileOffset..], (ulong)pos);
        BinaryPrimitives.WriteUInt32BigEndian(cluster0[QcowHeader.OffsetBackingFileSize..], (uint)bytes.Length);
        h.BackingFileOffset = (ulong)pos;
        h.BackingFileSize = (uint)bytes.Length;
    }
}
