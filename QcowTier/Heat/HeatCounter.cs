namespace QcowTier.Heat;

/// <summary>
/// One-byte logarithmic operation counter (a Morris counter with an exact low range), so a heat map
/// costs two bytes per tracked unit. Codes 0–63 are exact counts; above, code c stands for
/// (8 + (c &amp; 7)) &lt;&lt; ((c &gt;&gt; 3) - 5), i.e. three bits of mantissa (7–12 % steps) up to about 10⁹.
/// Increments above the exact range happen with probability 1/step, so the expected value is exact.
/// </summary>
internal static class HeatCounter
{
    public const int ExactLimit = 64;
    public const byte MaxCode = 255;

    public static long Decode(byte code)
    {
        if (code < ExactLimit)
        {
            return code;
        }
        var e = (code >> 3) - 5;
        return (8L + (code & 7)) << e;
    }

    /// <summary>The code whose value is closest below or equal to <paramref name="value"/>, plus the remainder to round randomly.</summary>
    public static byte EncodeFloor(long value, out long step, out long remainder)
    {
        if (value < ExactLimit)
        {
            step = 1;
            remainder = 0;
            return (byte)Math.Max(0, value);
        }
        var e = 63 - System.Numerics.BitOperations.LeadingZeroCount((ulong)value) - 3; // value = (8..15) << e
        if (e > (MaxCode >> 3) - 5)
        {
            step = 1;
            remainder = 0;
            return MaxCode;
        }
        var mantissa = (int)(value >> e) - 8;
        var code = (byte)(((e + 5) << 3) | mantissa);
        step = 1L << e;
        remainder = value - Decode(code);
        return code;
    }

    /// <summary>Encodes with probabilistic rounding, so sums and decays stay unbiased.</summary>
    public static byte Encode(long value, ref ulong rng)
    {
        var code = EncodeFloor(value, out var step, out var rem);
        if (rem > 0 && code < MaxCode)
        {
            var next = Decode((byte)(code + 1));
            var gap = next - Decode(code);
            if ((long)(NextRandom(ref rng) % (ulong)gap) < rem)
            {
                code++;
            }
        }
        _ = step;
        return code;
    }

    /// <summary>Whether an increment of <paramref name="code"/> should take effect: always in the exact range, else with probability 1/step.</summary>
    public static bool ShouldIncrement(byte code, ref ulong rng)
    {
        if (code < ExactLimit - 1)
        {
            return true;
        }
        if (code == MaxCode)
        {
            return false;
        }
        var gap = Decode((byte)(code + 1)) - Decode(code);
        return gap <= 1 || NextRandom(ref rng) % (ulong)gap == 0;
    }

    public static ulong NextRandom(ref ulong state)
    {
        // xorshift64*: a few cycles, good enough to pick increments.
        var x = state == 0 ? 0x9E3779B97F4A7C15UL : state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state = x;
        return x * 0x2545F4914F6CDD1DUL;
    }
}
