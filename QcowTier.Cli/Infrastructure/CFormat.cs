using System.Globalization;
using System.Numerics;

namespace QcowTier.Cli.Infrastructure;

/// <summary>
/// printf's "%.Nf" exactly as glibc does it: the double's exact binary value rounded half-to-even.
/// .NET rounds decimal midpoints away from zero, which would differ from qemu-img on values like 0.125.
/// </summary>
internal static class CFormat
{
    public static string Fixed(double value, int decimals, int minWidth = 0, char pad = ' ')
    {
        if (double.IsNaN(value) || double.IsInfinity(value))
        {
            return value.ToString(CultureInfo.InvariantCulture).ToLowerInvariant();
        }
        var negative = value < 0 || (value == 0 && double.IsNegative(value));
        var q = Round(Math.Abs(value), decimals);
        var digits = q.ToString(CultureInfo.InvariantCulture);
        if (decimals > 0)
        {
            digits = digits.PadLeft(decimals + 1, '0');
            digits = digits[..^decimals] + "." + digits[^decimals..];
        }
        if (negative && q != 0)
        {
            digits = "-" + digits;
        }
        return pad == '0' && digits.StartsWith('-') ? "-" + digits[1..].PadLeft(minWidth - 1, '0') : digits.PadLeft(minWidth, pad);
    }

    /// <summary>value × 10^decimals rounded half-to-even from the double's exact value (decimals may be negative).</summary>
    public static BigInteger Round(double value, int decimals)
    {
        var bits = BitConverter.DoubleToInt64Bits(Math.Abs(value));
        var exponent = (int)((bits >> 52) & 0x7FF);
        var mantissa = bits & 0xFFFFFFFFFFFFFL;
        if (exponent == 0)
        {
            exponent = 1;
        }
        else
        {
            mantissa |= 1L << 52;
        }
        exponent -= 1075;
        var num = new BigInteger(mantissa) * (decimals >= 0 ? BigInteger.Pow(10, decimals) : BigInteger.One);
        var den = decimals >= 0 ? BigInteger.One : BigInteger.Pow(10, -decimals);
        if (exponent >= 0)
        {
            num <<= exponent;
        }
        else
        {
            den <<= -exponent;
        }
        var q = BigInteger.DivRem(num, den, out var rem);
        var twice = rem * 2;
        if (twice > den || (twice == den && !q.IsEven))
        {
            q += 1;
        }
        return q;
    }
}
