using System.Buffers.Binary;

namespace QcowTier.Format;

/// <summary>
/// Reads and writes one entry of a refcount block of any width from 1 to 64 bits
/// (refcount_order 0-6). Sub-byte widths pack entries from the least significant bit,
/// as QEMU's get_refcount_ro0..2 do.
/// </summary>
internal static class RefcountBlock
{
    public static ulong Get(ReadOnlySpan<byte> block, int index, int order)
    {
        switch (order)
        {
            case 0: return (uint)(block[index >> 3] >> (index & 7)) & 1;
            case 1: return (uint)(block[index >> 2] >> (2 * (index & 3))) & 3;
            case 2: return (uint)(block[index >> 1] >> (4 * (index & 1))) & 15;
            case 3: return block[index];
            case 4: return BinaryPrimitives.ReadUInt16BigEndian(block[(index * 2)..]);
            case 5: return BinaryPrimitives.ReadUInt32BigEndian(block[(index * 4)..]);
            default: return BinaryPrimitives.ReadUInt64BigEndian(block[(index * 8)..]);
        }
    }

    public static void Set(Span<byte> block, int index, int order, ulong value)
    {
        switch (order)
        {
            case 0:
                {
                    var shift = index & 7;
                    block[index >> 3] = (byte)((block[index >> 3] & ~(1 << shift)) | ((int)value << shift));
                    break;
                }
            case 1:
                {
                    var shift = 2 * (index & 3);
                    block[index >> 2] = (byte)((block[index >> 2] & ~(3 << shift)) | ((int)value << shift));
                    break;
                }
            case 2:
                {
                    var shift = 4 * (index & 1);
                    block[index >> 1] = (byte)((block[index >> 1] & ~(15 << shift)) | ((int)value << shift));
                    break;
                }
            case 3: block[index] = (byte)value; break;
            case 4: BinaryPrimitives.WriteUInt16BigEndian(block[(index * 2)..], (ushort)value); break;
            case 5: BinaryPrimitives.WriteUInt32BigEndian(block[(index * 4)..], (uint)value); break;
            default: BinaryPrimitives.WriteUInt64BigEndian(block[(index * 8)..], value); break;
        }
    }

    public static ulong MaxValue(int order) => order == 6 ? ulong.MaxValue : (1UL << (1 << order)) - 1;
}
